"""Merge configuration: mergekit's YAML for the methods moefuse implements.

Accepted keys: `merge_method`, `base_model`, `models` (each `model` plus optional `parameters`),
`parameters`, `dtype`, `out_dtype`, `tokenizer_source` (`base` or a model path),
`tokenizer: {source: ...}`, `name`, `align` (true: match each model's FFN neurons to the base, or the
first model, layer by layer before merging; see moefuse.moe.align). Models are local folders (no hub downloads). A parameter
value is a number/bool/string; a list of numbers (a gradient over the layers, interpolated at
t = layer / (layers - 1), t = 0 outside the layer stack); or a list of `{filter, value}`
conditions, the first whose filter is a substring of the tensor name (or `*`/absent) applying.
A model's own parameters take precedence over the global ones; a per-model parameter may be set
globally for all models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type, Union

import torch
import yaml

from moefuse.errors import MergeConfigError, MoefuseError
from moefuse.methods import get_method

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "name", "align",
)
UNSUPPORTED_KEYS = {
    "slices": "layer slices (passthrough / frankenmerges) are not supported yet; list whole models under 'models'",
    "modules": "multi-module configurations are not supported yet; list whole models under 'models'",
    "chat_template": "setting a chat template is not supported yet; edit tokenizer_config.json after merging",
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

Setting = Union[int, float, bool, str, list, dict, None]


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    parameters: Dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    models: List[ModelEntry]
    base_model: Optional[Path] = None
    parameters: Dict[str, Setting] = field(default_factory=dict)
    dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None
    tokenizer_source: Optional[Path] = None  # None: the base model (or the first model)
    align: bool = False  # permute each model's FFN neurons to match the reference before merging


def checkpoint_dtype(model_config: dict) -> Optional[torch.dtype]:
    """The dtype a Hugging Face config.json names (`dtype`, or the older `torch_dtype`), if any."""
    name = model_config.get("dtype") or model_config.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def parse_dtype(value: Any, key: str, error: Type[MoefuseError] = MergeConfigError) -> Optional[torch.dtype]:
    """The torch dtype a config option names (None when unset); an unknown name raises `error`."""
    if value is None:
        return None
    if value not in DTYPES:
        raise error(f"config: '{key}: {value}' is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[value]


def _model_path(value: Any, where: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise MergeConfigError(f"config: {where} must be a path to a model folder, got {value!r}")
    if "+" in str(value) and not Path(value).exists():
        raise MergeConfigError(f"config: {where} '{value}' looks like a model+LoRA reference; LoRA merging is not supported")
    return Path(value).expanduser()


def _parameters(value: Any, where: str) -> Dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"config: {where} must be a mapping of parameter names to values, got {value!r}")
    return dict(value)


def read_yaml_mapping(source: Union[str, os.PathLike, dict], error: Type[MoefuseError], what: str) -> dict:
    """A configuration as a mapping: a dict as given, or a YAML file read; anything else raises
    `error` naming the file and `what` configuration it should hold."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.is_file():
        raise error(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as problem:
        raise error(f"config file {path} is not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"the {what} config {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_config(source: Union[str, os.PathLike, dict]) -> MergeConfig:
    """Read a merge configuration from a YAML file path or an already-parsed dict."""
    data = read_yaml_mapping(source, MergeConfigError, "merge")
    for key, reason in UNSUPPORTED_KEYS.items():
        if data.get(key):
            raise MergeConfigError(f"config: '{key}': {reason}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS) - set(UNSUPPORTED_KEYS))
    if unknown:
        raise MergeConfigError(f"config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    if "merge_method" not in data:
        raise MergeConfigError("config: 'merge_method' is required")
    spec = get_method(data["merge_method"])

    models = []
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeConfigError(f"config: models[{i}] must be a mapping with a 'model' key, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise MergeConfigError(f"config: models[{i}] has unknown key(s) {', '.join(extra)}; valid: model, parameters")
        models.append(ModelEntry(_model_path(entry["model"], f"models[{i}].model"),
                                 _parameters(entry.get("parameters"), f"models[{i}].parameters")))
    if not models:
        raise MergeConfigError("config: 'models' must list at least one model")

    base = _model_path(data["base_model"], "base_model") if data.get("base_model") is not None else None
    if spec.needs_base and base is None:
        raise MergeConfigError(f"config: merge_method '{spec.name}' needs a 'base_model'")

    tokenizer_source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict) or set(tokenizer) - {"source"}:
            raise MergeConfigError("config: 'tokenizer' supports only {source: base | <model path>}")
        tokenizer_source = tokenizer.get("source", tokenizer_source)
    if tokenizer_source == "union":
        raise MergeConfigError("config: tokenizer_source 'union' (vocabulary merging) is not supported; use 'base' or a model path")
    align = data.get("align", False)
    if not isinstance(align, bool):
        raise MergeConfigError(f"config: 'align' must be true or false, got {align!r}")
    return MergeConfig(
        align=align,
        merge_method=spec.name,
        models=models,
        base_model=base,
        parameters=_parameters(data.get("parameters"), "parameters"),
        dtype=parse_dtype(data.get("dtype"), "dtype"),
        out_dtype=parse_dtype(data.get("out_dtype"), "out_dtype"),
        tokenizer_source=None if tokenizer_source in (None, "base") else _model_path(tokenizer_source, "tokenizer_source"),
    )


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value a (possibly filtered or gradient) setting takes for one tensor; None if no
    filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, (dict, list)) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        position = t * (len(setting) - 1)
        low = int(position)
        high = min(len(setting) - 1, low + 1)
        fraction = position - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    for condition in setting:
        if not isinstance(condition, dict) or "value" not in condition:
            raise MergeConfigError(f"config: a filtered parameter needs {{filter, value}} entries, got {condition!r}")
        pattern = condition.get("filter")
        if pattern in (None, "*") or pattern in tensor_name:
            return evaluate_setting(condition["value"], tensor_name, t)
    return None
