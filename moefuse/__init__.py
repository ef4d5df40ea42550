"""moefuse: fast, memory-frugal model merging and merged mixtures of experts.

Importing moefuse needs neither a GPU nor the compiled extension; the fast backends load lazily.
"""

from moefuse.errors import MergeConfigError, MergeInputError, MoefuseError
from moefuse.integrations.transformers import apply_to
from moefuse.merge import merge_checkpoints
from moefuse.methods import get_method, method_names
from moefuse.moe.auto_registration import install as _install_auto_registration
from moefuse.moe.build import build_moe
from moefuse.moe.build_hetero import build_hetero_moe
from moefuse.ops.assignment import linear_assignment
from moefuse.ops.grouped_moe import grouped_moe
from moefuse.ops.merge import merge_tensors

__version__ = "0.1.0"

# AutoConfig / AutoModelForCausalLM learn the `moefuse_moe` model once transformers' Auto modules load
_install_auto_registration()

__all__ = [
    "MergeConfigError",
    "MergeInputError",
    "MoefuseError",
    "apply_to",
    "build_hetero_moe",
    "build_moe",
    "get_method",
    "grouped_moe",
    "linear_assignment",
    "merge_checkpoints",
    "merge_tensors",
    "method_names",
    "__version__",
]
