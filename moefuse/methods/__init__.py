"""Merge methods as declarative specs; importing this package registers all of them."""

from moefuse.methods import (  # noqa: F401  (registration)
    gta,
    linear,
    model_stock,
    nearswap,
    passthrough,
    sce,
    slerp,
    spherical,
)
from moefuse.methods.base import (
    MethodSpec,
    ParamSpec,
    ResolvedParams,
    all_methods,
    get_method,
    method_names,
    resolve_params,
)

__all__ = [
    "MethodSpec",
    "ParamSpec",
    "ResolvedParams",
    "all_methods",
    "get_method",
    "method_names",
    "resolve_params",
]
