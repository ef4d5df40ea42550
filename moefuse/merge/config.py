"""Merge configuration: mergekit's YAML for the methods moefuse implements.

Accepted keys: `merge_method`, `base_model`, `models` (each `model` plus optional `parameters`) or
`slices` (see below), `parameters`, `dtype`, `out_dtype`, `tokenizer_source` (`base`, `union` or a
model path) or `tokenizer: {source, tokens, pad_to_multiple_of}` (either one aligns the models'
vocabularies by token; see moefuse.merge.vocabulary), `chat_template` (`auto`, a built-in name or a
Jinja template; see moefuse.merge.chat_template), `name`, `align` (true: match each model's FFN
neurons to the base, or the first model, layer by layer before merging; see moefuse.moe.align).
Models are local folders (no hub downloads), or `MODEL+ADAPTER` for a model with a PEFT LoRA adapter
folder applied as it is read (see moefuse.io.lora). A parameter
value is a number/bool/string; a list of numbers (a gradient over the layers, interpolated at
t = layer / (layers - 1), t = 0 outside the layer stack); or a list of `{filter, value}`
conditions, the first whose filter is a substring of the tensor name (or `*`/absent) applying.
A model's own parameters take precedence over the global ones; a per-model parameter may be set
globally for all models.

`slices` (mergekit's layer slices; a slice's `residual_weight` is ignored with a warning, as mergekit
0.1.5 reads it but never uses it) build the output's layer stack slice by slice, in order: each
slice lists `sources` (`model`, `layer_range: [start, stop)`, optional `parameters`), all of the same
length, and optionally its own `base_model` and `parameters`. Output layer `offset + i` of a slice
merges layer `start + i` of each source; gradients run over each slice (t = i / (length - 1), 1 for
a one-layer slice). Precedence: a source's parameters, then its slice's, then the global ones. The
tensors outside the layer stack come from the first slice's sources (embeddings) or the last
slice's (final norm, LM head), at t = 0. With `passthrough` (one source per slice), slices of
different models make a "frankenmerge" with a new number of layers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import yaml

from moefuse.errors import MergeConfigError, MoefuseError
from moefuse.merge.chat_template import check_chat_template
from moefuse.methods import get_method

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "align",
)
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
TOKEN_SOURCE_KINDS = ("model_token", "zero")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
UNSUPPORTED_KEYS = {
    "modules": "multi-module configurations are not supported yet; list whole models under 'models'",
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

Setting = Union[int, float, bool, str, list, dict, None]


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    parameters: Dict[str, Setting] = field(default_factory=dict)
    adapter: Optional[Path] = None  # a LoRA adapter folder applied to the model (MODEL+ADAPTER)


@dataclass(frozen=True)
class SliceSource:
    """Layers [layer_range[0], layer_range[1]) of one model (with a LoRA `adapter`, if given)."""

    path: Path
    layer_range: Tuple[int, int]
    parameters: Dict[str, Setting] = field(default_factory=dict)
    adapter: Optional[Path] = None

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers merged from `sources` (each of the same length)."""

    sources: Tuple[SliceSource, ...]
    base_model: Optional[Path] = None
    base_adapter: Optional[Path] = None
    parameters: Dict[str, Setting] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from: `model`'s row for that same token (kind `model`), for
    another token of it named by `token` or `token_id` (kind `model_token`), or zeros (`zero`)."""

    kind: str
    model: Optional[Path] = None
    token: Optional[str] = None
    token_id: Optional[int] = None


@dataclass(frozen=True)
class TokenRule:
    """mergekit's `tokenizer.tokens.<token>`: the token's stand-in row for the models that lack it
    (None: the automatic one), given to every model with `force`."""

    source: Optional[TokenSource] = None
    force: bool = False


@dataclass(frozen=True)
class VocabularyConfig:
    """The output vocabulary (`source`: "base", "union" or a model folder), per-token rules, and a
    multiple the number of rows is padded up to."""

    source: Union[str, Path] = "union"
    tokens: Dict[str, TokenRule] = field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = None


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    models: List[ModelEntry]  # empty when the config gives `slices`
    base_model: Optional[Path] = None
    parameters: Dict[str, Setting] = field(default_factory=dict)
    dtype: Optional[torch.dtype] = None
    base_adapter: Optional[Path] = None  # a LoRA adapter applied to the base (BASE+ADAPTER)
    out_dtype: Optional[torch.dtype] = None
    vocabulary: Optional[VocabularyConfig] = None  # None: tensors merged row by row as stored
    chat_template: Optional[str] = None  # "auto", a built-in name or a Jinja template
    align: bool = False  # permute each model's FFN neurons to match the reference before merging
    slices: Tuple[OutputSlice, ...] = ()  # the layer stack, slice by slice (empty: whole `models`)


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


def _path_text(value: Any, where: str) -> str:
    """`value` as text, refused unless it is a path."""
    if not isinstance(value, (str, os.PathLike)):
        raise MergeConfigError(f"config: {where} must be a path to a model folder, got {value!r}")
    return str(value)


def _model_path(value: Any, where: str) -> Path:
    if "+" in _path_text(value, where) and not Path(value).expanduser().exists():
        raise MergeConfigError(f"config: {where} '{value}' looks like a MODEL+ADAPTER reference, which is taken "
                               "for models only (base_model, models, slice sources)")
    return Path(value).expanduser()


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.safetensors")))


def model_reference(value: Any, where: str) -> Tuple[Path, Optional[Path]]:
    """(model folder, LoRA adapter folder or None) of mergekit's `MODEL` or `MODEL+ADAPTER`: split
    at the first '+' that leaves a model folder (config.json or safetensors files) on its left,
    else at the first '+'."""
    text = _path_text(value, where)
    if "+" not in text or Path(text).expanduser().exists():
        return Path(text).expanduser(), None
    cuts = [i for i, char in enumerate(text) if char == "+"]
    cut = next((i for i in cuts if _is_model_folder(Path(text[:i]).expanduser())), cuts[0])
    if not text[cut + 1:]:
        raise MergeConfigError(f"config: {where} '{text}' names no adapter after '+'; write MODEL+ADAPTER")
    return Path(text[:cut]).expanduser(), Path(text[cut + 1:]).expanduser()


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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as problem:
        raise error(f"config file {path} is not UTF-8 text ({problem.reason} at byte {problem.start}); "
                    "save it as UTF-8") from None
    except yaml.YAMLError as problem:
        raise error(f"config file {path} is not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"the {what} config {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_config(source: Union[str, os.PathLike, dict]) -> MergeConfig:
    """Read a merge configuration from a YAML file path or an already-parsed dict."""
    data = read_yaml_mapping(source, MergeConfigError, "merge")
    for key, reason in UNSUPPORTED_KEYS.items():
        if data.get(key) is not None:  # even empty: a config that names the feature expects it to act
            raise MergeConfigError(f"config: '{key}': {reason}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS) - set(UNSUPPORTED_KEYS))
    if unknown:
        raise MergeConfigError(f"config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    if "merge_method" not in data:
        raise MergeConfigError("config: 'merge_method' is required")
    spec = get_method(data["merge_method"])

    sliced = data.get("slices") is not None
    if sliced and data.get("models") is not None:
        raise MergeConfigError("config: give either 'models' or 'slices', not both")
    models = [] if sliced else _models(data.get("models"))
    slices = _slices(data["slices"]) if sliced else ()

    base, base_adapter = model_reference(data["base_model"], "base_model") if data.get("base_model") is not None \
        else (None, None)
    if spec.needs_base and base is None and (not slices or any(piece.base_model is None for piece in slices)):
        raise MergeConfigError(f"config: merge_method '{spec.name}' needs a 'base_model'")

    vocabulary = _vocabulary(data.get("tokenizer_source"), data.get("tokenizer"))
    align = data.get("align", False)
    if not isinstance(align, bool):
        raise MergeConfigError(f"config: 'align' must be true or false, got {align!r}")
    if align and slices:
        raise MergeConfigError("config: 'align: true' works with 'models' only, not with 'slices'")
    return MergeConfig(
        align=align,
        slices=slices,
        merge_method=spec.name,
        models=models,
        base_model=base,
        base_adapter=base_adapter,
        parameters=_parameters(data.get("parameters"), "parameters"),
        dtype=parse_dtype(data.get("dtype"), "dtype"),
        out_dtype=parse_dtype(data.get("out_dtype"), "out_dtype"),
        vocabulary=vocabulary,
        chat_template=_chat_template(data.get("chat_template")),
    )


def _vocabulary(tokenizer_source: Any, tokenizer: Any) -> Optional[VocabularyConfig]:
    """The vocabulary alignment `tokenizer_source` or the `tokenizer` section asks for (None if neither)."""
    if tokenizer_source is not None and tokenizer is not None:
        raise MergeConfigError("config: give either 'tokenizer_source' or 'tokenizer', not both")
    if tokenizer_source is not None:
        return VocabularyConfig(_vocabulary_source(tokenizer_source, "tokenizer_source"))
    if tokenizer is None:
        return None
    tokenizer = _mapping(tokenizer, "tokenizer", TOKENIZER_KEYS)
    multiple = tokenizer.get("pad_to_multiple_of")
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise MergeConfigError(f"config: tokenizer.pad_to_multiple_of must be a positive integer, got {multiple!r}")
    tokens = tokenizer.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise MergeConfigError(f"config: tokenizer.tokens must map tokens to {{source, force}}, got {tokens!r}")
    return VocabularyConfig(_vocabulary_source(tokenizer.get("source", "union"), "tokenizer.source"),
                            {str(token): _token_rule(rule, f"tokenizer.tokens[{token!r}]") for token, rule in tokens.items()},
                            multiple)


def _vocabulary_source(value: Any, where: str) -> Union[str, Path]:
    return value if value in ("base", "union") else _model_path(value, where)


def _token_rule(value: Any, where: str) -> TokenRule:
    rule = _mapping(value if value is not None else {}, where, TOKEN_KEYS)
    force = rule.get("force", False)
    if not isinstance(force, bool):
        raise MergeConfigError(f"config: {where}.force must be true or false, got {force!r}")
    source = rule.get("source")
    if source is None:
        if force:
            raise MergeConfigError(f"config: {where}.force needs a source (a model path, or kind model_token or zero)")
        return TokenRule(None, force)
    if not isinstance(source, dict):
        return TokenRule(TokenSource("model", _model_path(source, f"{where}.source")), force)
    kind = source.get("kind")
    if kind not in TOKEN_SOURCE_KINDS:
        raise MergeConfigError(f"config: {where}.source.kind must be one of {', '.join(TOKEN_SOURCE_KINDS)}, "
                               f"got {kind!r} (or give a model path as the source)")
    if kind == "zero":
        _mapping(source, f"{where}.source", ("kind",))
        return TokenRule(TokenSource("zero"), force)
    source = _mapping(source, f"{where}.source", ("kind", "model", "token", "token_id"))
    token, token_id = source.get("token"), source.get("token_id")
    if "model" not in source or (token is None) == (token_id is None):
        raise MergeConfigError(f"config: {where}.source of kind model_token needs 'model' and one of 'token' or 'token_id'")
    if token is not None and not isinstance(token, str):
        raise MergeConfigError(f"config: {where}.source.token must be a string, got {token!r}")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise MergeConfigError(f"config: {where}.source.token_id must be a non-negative integer, got {token_id!r}")
    return TokenRule(TokenSource("model_token", _model_path(source["model"], f"{where}.source.model"), token, token_id), force)


def _chat_template(value: Any) -> Optional[str]:
    return None if value is None else check_chat_template(value)


def _models(listed: Any) -> List[ModelEntry]:
    models = []
    for i, entry in enumerate(listed or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeConfigError(f"config: models[{i}] must be a mapping with a 'model' key, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise MergeConfigError(f"config: models[{i}] has unknown key(s) {', '.join(extra)}; valid: model, parameters")
        path, adapter = model_reference(entry["model"], f"models[{i}].model")
        models.append(ModelEntry(path, _parameters(entry.get("parameters"), f"models[{i}].parameters"), adapter))
    if not models:
        raise MergeConfigError("config: 'models' (or 'slices') must list at least one model")
    return models


def _mapping(value: Any, where: str, keys: Tuple[str, ...]) -> dict:
    """`value` checked to be a mapping with only `keys`."""
    if not isinstance(value, dict):
        raise MergeConfigError(f"config: {where} must be a mapping with keys {', '.join(keys)}, got {value!r}")
    extra = sorted(set(value) - set(keys))
    if extra:
        raise MergeConfigError(f"config: {where} has unknown key(s) {', '.join(extra)}; valid: {', '.join(keys)}")
    return value


def _layer_range(value: Any, where: str) -> Tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or not 0 <= value[0] < value[1]):
        raise MergeConfigError(f"config: {where} must be [start, stop] with 0 <= start < stop, got {value!r}")
    return int(value[0]), int(value[1])


def _slices(listed: Any) -> Tuple[OutputSlice, ...]:
    if not isinstance(listed, list):
        raise MergeConfigError(f"config: 'slices' must be a list of slices, got {listed!r}")
    slices = []
    for i, entry in enumerate(listed):
        where = f"slices[{i}]"
        entry = _mapping(entry, where, SLICE_KEYS + ("residual_weight",))
        residual = entry.get("residual_weight")
        if residual is not None:
            if isinstance(residual, bool) or not isinstance(residual, (int, float)):
                raise MergeConfigError(f"config: {where}.residual_weight must be a number, got {residual!r}")
            warnings.warn(f"config: {where}.residual_weight is ignored, as mergekit 0.1.5 ignores it "
                          "(it is read but never used there)", stacklevel=3)
        if not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise MergeConfigError(f"config: {where}.sources must list at least one source")
        sources = []
        for j, source in enumerate(entry["sources"]):
            at = f"{where}.sources[{j}]"
            source = _mapping(source, at, SOURCE_KEYS)
            if "model" not in source or "layer_range" not in source:
                raise MergeConfigError(f"config: {at} needs 'model' and 'layer_range'")
            path, adapter = model_reference(source["model"], f"{at}.model")
            sources.append(SliceSource(path, _layer_range(source["layer_range"], f"{at}.layer_range"),
                                       _parameters(source.get("parameters"), f"{at}.parameters"), adapter))
        lengths = sorted({source.length for source in sources})
        if len(lengths) > 1:
            raise MergeConfigError(f"config: the sources of {where} span different numbers of layers ({lengths}); "
                                   "give every source of a slice a layer_range of the same length")
        base = entry.get("base_model")
        base, base_adapter = model_reference(base, f"{where}.base_model") if base is not None else (None, None)
        slices.append(OutputSlice(tuple(sources), base, base_adapter, _parameters(entry.get("parameters"),
                                                                                  f"{where}.parameters")))
    if not slices:
        raise MergeConfigError("config: 'slices' must list at least one slice")
    return tuple(slices)


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
