"""MoE build configuration: mergekit-moe's YAML plus moefuse's own keys.

mergekit-moe keys (a mergekit-moe config runs unchanged):
    base_model, experts (source_model, positive_prompts, negative_prompts, noise_scale,
    residual_scale), gate_mode (hidden, cheap_embed, random, uniform_random), dtype,
    experts_per_token, shared_experts, architecture.
    `hidden_avg` (mean over the prompt instead of its last token) is accepted as mergekit does.
moefuse keys:
    mode              homogeneous (the default; this module) or heterogeneous (experts of different
                      architectures; parsed and built by `moefuse.moe.build_hetero`)
    seed              seeds `random`/`uniform_random` gates and expert noise (default 0)
    gate_mode: perplexity
                      MergeME's sequence-level routing by each expert's perplexity; writes the
                      `moefuse_moe` model class (no router weights)
    separate_attention
                      each expert keeps its own attention (and norms); `moefuse_moe` class
    routing_temperature
                      softmax temperature of perplexity routing (default 1)
    shared_weights    how the non-expert tensors (embeddings, attention, norms, head) are made:
                      a list of rules `{filter: <substring or group>, method: <m>, parameters: {...}}`,
                      the first rule whose filter matches a tensor applying (no filter: all).
                      Groups: embeddings, attention, norms, head. Methods: `base` (copy the base
                      model's tensor; the default, as mergekit-moe), `average` (mean of the experts'
                      tensors) or any merge method of `moefuse methods` (base + the experts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from moefuse.errors import MoefuseError
from moefuse.merge.config import parse_dtype, read_yaml_mapping
from moefuse.methods import get_method

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random", "perplexity")
PROMPT_GATE_MODES = ("hidden", "hidden_avg", "cheap_embed")
TOP_LEVEL_KEYS = (
    "base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
    "seed", "separate_attention", "routing_temperature", "shared_weights", "mode",
)
MODES = ("homogeneous", "heterogeneous")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
SHARED_METHODS = ("base", "average")
TENSOR_GROUPS = {
    "embeddings": ("embed_tokens.",),
    "attention": (".self_attn.",),
    "norms": ("norm.",),
    "head": ("lm_head.",),
}


class MoeConfigError(MoefuseError, ValueError):
    """An MoE build configuration is invalid."""


@dataclass(frozen=True)
class ExpertSpec:
    source_model: Path
    positive_prompts: List[str] = field(default_factory=list)
    negative_prompts: List[str] = field(default_factory=list)
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


@dataclass(frozen=True)
class SharedRule:
    """How the shared tensors a filter matches are made."""

    filter: Optional[str]
    method: str
    parameters: Dict[str, Any] = field(default_factory=dict)

    def matches(self, key: str) -> bool:
        if self.filter in (None, "*"):
            return True
        patterns = TENSOR_GROUPS.get(self.filter, (self.filter,))
        return any(pattern in key for pattern in patterns)


@dataclass(frozen=True)
class MoeBuildConfig:
    base_model: Path
    experts: List[ExpertSpec]
    gate_mode: str = "hidden"
    dtype: Optional[torch.dtype] = None
    experts_per_token: int = 2
    shared_experts: List[ExpertSpec] = field(default_factory=list)
    architecture: Optional[str] = None
    seed: int = 0
    separate_attention: bool = False
    routing_temperature: float = 1.0
    shared_weights: List[SharedRule] = field(default_factory=list)

    @property
    def gate_experts(self) -> List[ExpertSpec]:
        """The experts that need a gate vector: routed experts, then shared ones (Qwen2-MoE)."""
        return self.experts + self.shared_experts

    def shared_rule(self, key: str) -> SharedRule:
        for rule in self.shared_weights:
            if rule.matches(key):
                return rule
        return SharedRule(None, "base")


def check_experts_per_token(per_token: int, experts: int) -> None:
    """experts_per_token may not exceed the number of experts."""
    if per_token > experts:
        raise MoeConfigError(f"config: experts_per_token is {per_token} but only {experts} expert(s) are listed; "
                             f"use at most {experts} or add experts")


def model_folder(value: Any, where: str) -> Path:
    """A config's local model folder path; `where` names the option in the error."""
    if not isinstance(value, (str, os.PathLike)):
        raise MoeConfigError(f"config: {where} must be a path to a local model folder, got {value!r}")
    return Path(value).expanduser()


def _prompts(value: Any, where: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise MoeConfigError(f"config: {where} must be a list of strings, got {value!r}")
    return list(value)


def _number(value: Any, where: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MoeConfigError(f"config: {where} must be a number, got {value!r}")
    return float(value)


def listed(data: dict, key: str) -> list:
    """The list `data[key]` (empty when absent); a single string or a mapping is refused, since
    iterating it would read characters or keys as entries."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MoeConfigError(f"config: '{key}' must be a list (one '- ' entry per expert), got {value!r}")
    return value


def _expert(entry: Any, where: str) -> ExpertSpec:
    if isinstance(entry, str):
        entry = {"source_model": entry}
    if not isinstance(entry, dict) or "source_model" not in entry:
        raise MoeConfigError(f"config: {where} must be a mapping with a 'source_model' key, got {entry!r}")
    unknown = sorted(set(entry) - set(EXPERT_KEYS))
    if unknown:
        raise MoeConfigError(f"config: {where} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(EXPERT_KEYS)}")
    return ExpertSpec(
        source_model=model_folder(entry["source_model"], f"{where}.source_model"),
        positive_prompts=_prompts(entry.get("positive_prompts"), f"{where}.positive_prompts"),
        negative_prompts=_prompts(entry.get("negative_prompts"), f"{where}.negative_prompts"),
        noise_scale=_number(entry.get("noise_scale"), f"{where}.noise_scale"),
        residual_scale=_number(entry.get("residual_scale"), f"{where}.residual_scale"),
    )


def _shared_rules(value: Any) -> List[SharedRule]:
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise MoeConfigError(f"config: shared_weights must be a list of {{filter, method, parameters}} rules, got {value!r}")
    rules = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or "method" not in entry:
            raise MoeConfigError(f"config: shared_weights[{i}] must be a mapping with a 'method' key, got {entry!r}")
        unknown = sorted(set(entry) - {"filter", "method", "parameters"})
        if unknown:
            raise MoeConfigError(f"config: shared_weights[{i}] has unknown key(s) {', '.join(unknown)}; valid: filter, method, parameters")
        method = entry["method"]
        if method not in SHARED_METHODS:
            spec = get_method(method)  # raises, listing the valid methods
            if not spec.needs_base or spec.max_models is not None:
                raise MoeConfigError(
                    f"config: shared_weights[{i}]: method '{spec.name}' cannot merge the base with every expert; "
                    f"use {', '.join(SHARED_METHODS)} or a method of `moefuse methods` taking a base and any "
                    "number of models (ties, dare_ties, task_arithmetic, ...)")
            method = spec.name
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            raise MoeConfigError(f"config: shared_weights[{i}].filter must be one tensor-name substring or group "
                                 f"name, got {entry['filter']!r}; write one rule per filter")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise MoeConfigError(f"config: shared_weights[{i}].parameters must be a mapping, got {parameters!r}")
        if method in SHARED_METHODS and parameters:
            raise MoeConfigError(f"config: shared_weights[{i}]: method '{method}' takes no parameters")
        rules.append(SharedRule(entry.get("filter"), method, dict(parameters)))
    return rules


def read_config_mapping(source: Union[str, os.PathLike, dict]) -> dict:
    """The MoE configuration as a mapping: a dict as given, or a YAML file read."""
    return read_yaml_mapping(source, MoeConfigError, "MoE")


def config_mode(source: Union[str, os.PathLike, dict, MoeBuildConfig]) -> str:
    """The `mode` of a configuration: homogeneous (the default) or heterogeneous."""
    if isinstance(source, MoeBuildConfig):
        return "homogeneous"
    mode = read_config_mapping(source).get("mode", "homogeneous")
    if mode not in MODES:
        raise MoeConfigError(f"config: mode {mode!r} is not supported; use one of {', '.join(MODES)}")
    return mode


def parse_moe_config(source: Union[str, os.PathLike, dict, MoeBuildConfig]) -> MoeBuildConfig:
    """Read and validate an MoE build configuration (YAML path, dict, or a config object)."""
    if isinstance(source, MoeBuildConfig):
        return source
    if config_mode(source) != "homogeneous":
        raise MoeConfigError("config: mode heterogeneous is built by moefuse.build_hetero_moe (or build_moe), "
                             "not parsed as a homogeneous MoE config")
    data = read_config_mapping(source)
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise MoeConfigError(f"config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    if data.get("base_model") is None:
        raise MoeConfigError("config: 'base_model' is required (the model whose non-expert weights and tokenizer are used)")
    experts = [_expert(e, f"experts[{i}]") for i, e in enumerate(listed(data, "experts"))]
    if not experts:
        raise MoeConfigError("config: 'experts' must list at least one expert (source_model: <folder>)")
    shared = [_expert(e, f"shared_experts[{i}]") for i, e in enumerate(listed(data, "shared_experts"))]

    gate_mode = data.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise MoeConfigError(f"config: gate_mode '{gate_mode}' is not supported; use one of {', '.join(GATE_MODES)}")
    per_token = data.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
        raise MoeConfigError(f"config: experts_per_token must be a positive integer, got {per_token!r}")
    check_experts_per_token(per_token, len(experts))
    if gate_mode in PROMPT_GATE_MODES:
        for i, expert in enumerate(experts):
            if not expert.positive_prompts:
                raise MoeConfigError(
                    f"config: experts[{i}] ({expert.source_model}) has no positive_prompts, which gate_mode "
                    f"'{gate_mode}' needs; add prompts or use gate_mode random"
                )
        prompt_sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in experts}
        if len(experts) > 1 and len(prompt_sets) == 1:
            raise MoeConfigError("config: every expert has the same prompts, so their gates would be identical; "
                                 "give each expert prompts for what should be routed to it")
    dtype = parse_dtype(data.get("dtype"), "dtype", MoeConfigError)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MoeConfigError(f"config: seed must be an integer, got {seed!r}")
    separate = data.get("separate_attention", False)
    if not isinstance(separate, bool):
        raise MoeConfigError(f"config: separate_attention must be true or false, got {separate!r}")
    temperature = _number(data.get("routing_temperature", 1.0), "routing_temperature")
    if temperature <= 0:
        raise MoeConfigError(f"config: routing_temperature must be positive, got {temperature}")
    architecture = data.get("architecture")
    if architecture is not None and not isinstance(architecture, str):
        raise MoeConfigError(f"config: architecture must be a name, got {architecture!r}")
    return MoeBuildConfig(
        base_model=model_folder(data["base_model"], "base_model"),
        experts=experts,
        gate_mode=gate_mode,
        dtype=dtype,
        experts_per_token=per_token,
        shared_experts=shared,
        architecture=architecture,
        seed=seed,
        separate_attention=separate,
        routing_temperature=temperature,
        shared_weights=_shared_rules(data.get("shared_weights")),
    )
