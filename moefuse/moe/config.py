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
                      tensors) or a merge method of `moefuse methods` that takes a base and any number
                      of models (base + the experts; see `shared_method_names`).
A `MoeBuildConfig` is checked when it is made (`check_moe_config`), so one built in Python gets the
checks a parsed YAML or dict gets; checks that need the model files are made by `MoeBuilder`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from moefuse.errors import MoefuseError
from moefuse.merge.config import DTYPES, parse_dtype, read_yaml_mapping
from moefuse.methods import all_methods, method_names

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
    """A homogeneous MoE build configuration. Every instance is validated on construction
    (`check_moe_config`), whether `parse_moe_config` made it from YAML or a caller built it."""

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

    def __post_init__(self) -> None:
        check_moe_config(self)

    @property
    def gate_experts(self) -> List[ExpertSpec]:
        """The experts that need a gate vector: routed experts, then shared ones (Qwen2-MoE)."""
        return self.experts + self.shared_experts

    def shared_rule(self, key: str) -> SharedRule:
        for rule in self.shared_weights:
            if rule.matches(key):
                return rule
        return SharedRule(None, "base")


def shared_method_names() -> List[str]:
    """The methods a shared_weights rule takes: `base`, `average`, and every merge method that
    merges a base with any number of models (so with every expert); not slerp, passthrough or linear."""
    return list(SHARED_METHODS) + [spec.name for spec in all_methods() if spec.needs_base and spec.max_models is None]


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


def _check_prompts(value: Any, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise MoeConfigError(f"config: {where} must be a list of strings, got {value!r}")


def _check_number(value: Any, where: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MoeConfigError(f"config: {where} must be a number, got {value!r}")


def _prompt_list(value: Any) -> Any:
    """A config's prompts as a list: none is [], one string a one-prompt list; else as given."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def check_dtype(dtype: Any) -> None:
    """Refuse an output dtype that is neither None (the input's) nor a floating one of DTYPES."""
    if dtype is not None and dtype not in DTYPES.values():
        raise MoeConfigError(f"config: dtype must be torch.float32, torch.bfloat16, torch.float16 or None, got {dtype!r}")


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
    """The ExpertSpec a config entry (a folder, or a mapping of EXPERT_KEYS) describes; a single
    prompt string becomes a one-prompt list. Values are checked by `check_moe_config`."""
    if isinstance(entry, str):
        entry = {"source_model": entry}
    if not isinstance(entry, dict) or "source_model" not in entry:
        raise MoeConfigError(f"config: {where} must be a mapping with a 'source_model' key, got {entry!r}")
    unknown = sorted(set(entry) - set(EXPERT_KEYS))
    if unknown:
        raise MoeConfigError(f"config: {where} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(EXPERT_KEYS)}")
    return ExpertSpec(
        source_model=model_folder(entry["source_model"], f"{where}.source_model"),
        positive_prompts=_prompt_list(entry.get("positive_prompts")),
        negative_prompts=_prompt_list(entry.get("negative_prompts")),
        noise_scale=entry.get("noise_scale"),
        residual_scale=entry.get("residual_scale"),
    )


def _shared_rules(value: Any) -> List[SharedRule]:
    """The SharedRules of a config's `shared_weights` (one mapping or a list of them); their
    filters, methods and parameters are checked by `check_moe_config`."""
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
        rules.append(SharedRule(entry.get("filter"), entry["method"], entry.get("parameters") or {}))
    return rules


def _check_expert(expert: Any, where: str) -> None:
    """Refuse an entry of experts/shared_experts that is not an ExpertSpec of valid values."""
    if not isinstance(expert, ExpertSpec):
        raise MoeConfigError(f"config: {where} must be an ExpertSpec, got {expert!r}")
    model_folder(expert.source_model, f"{where}.source_model")
    _check_prompts(expert.positive_prompts, f"{where}.positive_prompts")
    _check_prompts(expert.negative_prompts, f"{where}.negative_prompts")
    _check_number(expert.noise_scale, f"{where}.noise_scale", optional=True)
    _check_number(expert.residual_scale, f"{where}.residual_scale", optional=True)


def _check_experts(value: Any, key: str) -> None:
    """Refuse `experts`/`shared_experts` (named by `key`) unless a list of valid ExpertSpecs."""
    if not isinstance(value, list):
        raise MoeConfigError(f"config: {key} must be a list of ExpertSpec (one per expert), got {value!r}")
    for i, expert in enumerate(value):
        _check_expert(expert, f"{key}[{i}]")


def _check_prompt_gates(cfg: MoeBuildConfig) -> None:
    """Prompt-based gate modes need positive prompts for every expert, not all the same."""
    if cfg.gate_mode not in PROMPT_GATE_MODES:
        return
    for i, expert in enumerate(cfg.experts):
        if not expert.positive_prompts:
            raise MoeConfigError(
                f"config: experts[{i}] ({expert.source_model}) has no positive_prompts, which gate_mode "
                f"'{cfg.gate_mode}' needs; add prompts or use gate_mode random"
            )
    prompt_sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in cfg.experts}
    if len(cfg.experts) > 1 and len(prompt_sets) == 1:
        raise MoeConfigError("config: every expert has the same prompts, so their gates would be identical; "
                             "give each expert prompts for what should be routed to it")


def _check_rule(rule: Any, where: str) -> None:
    """Refuse a shared_weights rule with a non-string filter, a method that cannot merge the base
    with every expert (`shared_method_names`), or parameters that are not a mapping or that
    `base`/`average` would ignore. Parameter names and values are checked against the method
    when the expert count is known (`MoeBuilder`)."""
    if not isinstance(rule, SharedRule):
        raise MoeConfigError(f"config: {where} must be a SharedRule, got {rule!r}")
    if rule.filter is not None and not isinstance(rule.filter, str):
        raise MoeConfigError(f"config: {where}.filter must be one tensor-name substring or group name "
                             f"({', '.join(TENSOR_GROUPS)}), got {rule.filter!r}; write one rule per filter")
    names = shared_method_names()
    if not isinstance(rule.method, str) or rule.method not in names:
        reason = "cannot merge the base with every expert" if rule.method in method_names() else "is unknown"
        raise MoeConfigError(f"config: {where}: method {rule.method!r} {reason}; shared weights take one of "
                             f"{', '.join(names)}")
    if not isinstance(rule.parameters, dict):
        raise MoeConfigError(f"config: {where}.parameters must be a mapping, got {rule.parameters!r}")
    if rule.method in SHARED_METHODS and rule.parameters:
        raise MoeConfigError(f"config: {where}: method '{rule.method}' takes no parameters")


def _check_routing(cfg: MoeBuildConfig) -> None:
    """Refuse an unknown gate_mode, an experts_per_token that is not in [1, experts], prompts
    that a prompt-based gate mode cannot use, and a routing_temperature that is not positive."""
    if cfg.gate_mode not in GATE_MODES:
        raise MoeConfigError(f"config: gate_mode {cfg.gate_mode!r} is not supported; use one of {', '.join(GATE_MODES)}")
    per_token = cfg.experts_per_token
    if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
        raise MoeConfigError(f"config: experts_per_token must be a positive integer, got {per_token!r}")
    check_experts_per_token(per_token, len(cfg.experts))
    _check_prompt_gates(cfg)
    _check_number(cfg.routing_temperature, "routing_temperature")
    if not cfg.routing_temperature > 0:
        raise MoeConfigError(f"config: routing_temperature must be positive, got {cfg.routing_temperature}")


def _check_output_options(cfg: MoeBuildConfig) -> None:
    """Refuse a dtype, seed, separate_attention or architecture of the wrong type."""
    check_dtype(cfg.dtype)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise MoeConfigError(f"config: seed must be an integer, got {cfg.seed!r}")
    if not isinstance(cfg.separate_attention, bool):
        raise MoeConfigError(f"config: separate_attention must be true or false, got {cfg.separate_attention!r}")
    if cfg.architecture is not None and not isinstance(cfg.architecture, str):
        raise MoeConfigError(f"config: architecture must be a name, got {cfg.architecture!r}")


def check_moe_config(cfg: MoeBuildConfig) -> None:
    """Refuse an invalid configuration, naming the option: every check of a homogeneous MoE
    config that needs no model files (those are made by `MoeBuilder`)."""
    model_folder(cfg.base_model, "base_model")
    _check_experts(cfg.experts, "experts")
    if not cfg.experts:
        raise MoeConfigError("config: 'experts' must list at least one expert (source_model: <folder>)")
    _check_experts(cfg.shared_experts, "shared_experts")
    _check_routing(cfg)
    _check_output_options(cfg)
    if not isinstance(cfg.shared_weights, list):
        raise MoeConfigError(f"config: shared_weights must be a list of SharedRule, got {cfg.shared_weights!r}")
    for i, rule in enumerate(cfg.shared_weights):
        _check_rule(rule, f"shared_weights[{i}]")


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
    """Read and validate an MoE build configuration (YAML path, dict, or a config object, which
    was validated when it was made)."""
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
    return MoeBuildConfig(  # validated on construction (check_moe_config)
        base_model=model_folder(data["base_model"], "base_model"),
        experts=[_expert(e, f"experts[{i}]") for i, e in enumerate(listed(data, "experts"))],
        gate_mode=data.get("gate_mode", "hidden"),
        dtype=parse_dtype(data.get("dtype"), "dtype", MoeConfigError),
        experts_per_token=data.get("experts_per_token", 2),
        shared_experts=[_expert(e, f"shared_experts[{i}]") for i, e in enumerate(listed(data, "shared_experts"))],
        architecture=data.get("architecture"),
        seed=data.get("seed", 0),
        separate_attention=data.get("separate_attention", False),
        routing_temperature=data.get("routing_temperature", 1.0),
        shared_weights=_shared_rules(data.get("shared_weights")),
    )
