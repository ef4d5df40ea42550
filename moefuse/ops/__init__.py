"""Public tensor-level operations, each with its plain-PyTorch reference beside it."""

from moefuse.ops.merge import merge_tensors

__all__ = ["merge_tensors"]
