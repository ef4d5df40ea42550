"""Merge methods as declarative specs; importing this package registers all of them."""

from moefuse.methods import gta, linear, model_stock, passthrough, slerp  # noqa: F401  (registration)
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
