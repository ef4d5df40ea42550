"""moefuse: fast, memory-frugal model merging and merged mixtures of experts.

Importing moefuse needs neither a GPU nor the compiled extension, and it imports neither torch
nor transformers: the public functions load their modules on first use (so that the CLI can set
OpenMP's environment before torch starts its thread pool).
"""

import importlib

from moefuse.errors import MergeConfigError, MergeInputError, MoefuseError, NonfiniteInputError
from moefuse.methods import get_method, method_names
from moefuse.moe.auto_registration import install as _install_auto_registration

__version__ = "0.1.0"

# AutoConfig / AutoModelForCausalLM learn moefuse's model classes once transformers' Auto modules load
_install_auto_registration()

_LAZY = {
    "apply_to": "moefuse.integrations.transformers",
    "build_hetero_moe": "moefuse.moe.build_hetero",
    "build_moe": "moefuse.moe.build",
    "grouped_moe": "moefuse.ops.grouped_moe",
    "linear_assignment": "moefuse.ops.assignment",
    "merge_checkpoints": "moefuse.merge",
    "merge_streamed": "moefuse.ops.merge",
    "merge_tensors": "moefuse.ops.merge",
}


def __getattr__(name: str):
    """The public functions of `_LAZY`, imported from their modules on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moefuse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "MergeConfigError",
    "MergeInputError",
    "MoefuseError",
    "NonfiniteInputError",
    "apply_to",
    "build_hetero_moe",
    "build_moe",
    "get_method",
    "grouped_moe",
    "linear_assignment",
    "merge_checkpoints",
    "merge_streamed",
    "merge_tensors",
    "method_names",
    "__version__",
]
