"""Declarative merge-method specs and the registry the ops consume.

A method is data: its name, the parameters it takes (per model or global, with defaults and
ranges) and the family it belongs to. The ops layer turns a spec plus user parameters into a
numeric plan; no method holds tensor code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from moefuse.errors import MergeConfigError

MODEL_SCOPE = "model"
GLOBAL_SCOPE = "global"

# What a method does with the configured base model:
BASE_REQUIRED = "required"  # task vectors X_i - B are merged onto B; a base is needed
BASE_OPTIONAL = "optional"  # as BASE_REQUIRED when a base is given, else the X_i themselves are merged
BASE_AS_INPUT = "input"  # no base role: a configured base model is one more input (mergekit adds it)
BASE_UNUSED = "unused"  # no base role: only the listed models are merged


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: `scope` is "model" (one value per input model) or "global"."""

    name: str
    scope: str
    default: Any
    kind: type = float
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Optional[Tuple[Any, ...]] = None
    doc: str = ""

    def check(self, value: Any, where: str) -> Any:
        """Coerce `value` to this parameter's type and range, or raise naming `where`."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeConfigError(f"{where}: '{self.name}' must be true or false, got {value!r}")
            return value
        if self.choices is not None:
            if value not in self.choices:
                raise MergeConfigError(
                    f"{where}: '{self.name}' must be one of {list(self.choices)}, got {value!r}"
                )
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MergeConfigError(f"{where}: '{self.name}' must be a number, got {value!r}")
            if self.kind is int and int(value) != value:
                raise MergeConfigError(f"{where}: '{self.name}' must be an integer, got {value!r}")
            value = self.kind(value)
            if not math.isfinite(value):
                raise MergeConfigError(f"{where}: '{self.name}' must be finite, got {value!r}")
            if self.minimum is not None and value < self.minimum:
                raise MergeConfigError(f"{where}: '{self.name}' must be >= {self.minimum}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise MergeConfigError(f"{where}: '{self.name}' must be <= {self.maximum}, got {value!r}")
        return value


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its family ("gta", "linear", "slerp", "model_stock", "passthrough", "sphere",
    "nearswap", "sce"), its parameters and its `base` policy (one of the BASE_* constants).

    For the generalized task arithmetic ("gta") family, `sparsifier` is one of None,
    "magnitude", "breadcrumbs", "random", "della" and `consensus` says whether TIES sign
    election applies.
    """

    name: str
    family: str
    params: Tuple[ParamSpec, ...]
    doc: str
    base: str = BASE_REQUIRED
    min_models: int = 1
    max_models: Optional[int] = None
    sparsifier: Optional[str] = None
    consensus: bool = False
    reference_url: str = ""

    @property
    def needs_base(self) -> bool:
        return self.base == BASE_REQUIRED

    @property
    def uses_base(self) -> bool:
        """Whether a given base tensor plays the base's role (task vectors are taken against it)."""
        return self.base in (BASE_REQUIRED, BASE_OPTIONAL)

    def runs_torch_operations(self, shared: Mapping[str, Any]) -> bool:
        """Whether the merge runs as torch operations on small chunks (`moefuse.ops.merge`) rather
        than the fused kernels, given its global parameters `shared`: NearSwap, SCE, and nuslerp per
        vector (`nuslerp_flatten` false; a tensor of fewer than two dimensions is one vector, merged
        by the fused kernels)."""
        per_vector = self.name == "nuslerp" and shared.get("nuslerp_flatten") is False
        return self.family in ("nearswap", "sce") or per_vector

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def param_names(self) -> List[str]:
        return [spec.name for spec in self.params]


@dataclass(frozen=True)
class ResolvedParams:
    """User parameters checked against a spec: `per_model[name][i]` and `shared[name]`."""

    per_model: Dict[str, List[Any]] = field(default_factory=dict)
    shared: Dict[str, Any] = field(default_factory=dict)


_REGISTRY: Dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"merge method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Return the spec called `name`, or raise listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeConfigError(
            f"unknown merge method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def method_names() -> List[str]:
    return sorted(_REGISTRY)


def resolve_params(spec: MethodSpec, num_models: int, params: Mapping[str, Any]) -> ResolvedParams:
    """Check `params` against `spec`: unknown names are refused (listing the valid ones), a
    per-model parameter may be one value for all models or a sequence of `num_models` values."""
    unknown = sorted(set(params) - set(spec.param_names))
    if unknown:
        raise MergeConfigError(
            f"method '{spec.name}' has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(spec.param_names)}"
        )
    resolved = ResolvedParams()
    for pspec in spec.params:
        value = params.get(pspec.name, pspec.default)
        where = f"method '{spec.name}'"
        if value is None:
            raise MergeConfigError(f"{where}: parameter '{pspec.name}' is required")
        if pspec.scope == GLOBAL_SCOPE:
            resolved.shared[pspec.name] = pspec.check(value, where)
            continue
        values = _per_model_values(value, num_models, pspec.name, where)
        resolved.per_model[pspec.name] = [
            pspec.check(v, f"{where}, model {i}") for i, v in enumerate(values)
        ]
    return resolved


def _per_model_values(value: Any, num_models: int, name: str, where: str) -> Sequence[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_models:
            raise MergeConfigError(
                f"{where}: '{name}' has {len(value)} values but there are {num_models} models; "
                "give one value, or one per model"
            )
        return value
    return [value] * num_models


def all_methods() -> Iterable[MethodSpec]:
    return (_REGISTRY[name] for name in sorted(_REGISTRY))
