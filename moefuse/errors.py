"""Exception types. Every message names the offending input (file, tensor key, shape, option)
and says what to do about it."""

from typing import Optional


class MoefuseError(Exception):
    """Base class of every error moefuse raises on purpose."""


class MergeConfigError(MoefuseError, ValueError):
    """A merge method name, parameter or option is unknown or out of range."""


class MergeInputError(MoefuseError, ValueError):
    """Input tensors do not fit together (shape, dtype, device) or hold NaN/Inf."""


class NonfiniteInputError(MergeInputError):
    """An input tensor holds NaN or Inf. `index` is its position among the model tensors (None:
    the base) and `count` how many such values it holds."""

    def __init__(self, message: str, index: Optional[int] = None, count: int = 0):
        super().__init__(message)
        self.index = index
        self.count = count


class MoeInputError(MoefuseError, ValueError):
    """MoE tensors (hidden states, expert weights, routing) do not fit together, or a model has no
    supported sparse MoE block."""


class AssignmentError(MoefuseError, ValueError):
    """A linear assignment cost matrix is not 2-D, holds NaN or an infinity of the wrong sign, or
    has no complete assignment that avoids its forbidden (infinite) entries."""
