"""Checking a `--device` option before any work starts."""

from __future__ import annotations

import torch

from moefuse.errors import MoefuseError


class DeviceError(MoefuseError, ValueError):
    """A device name torch does not know, or a device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", ...) as a torch device, checked to exist here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was asked for but this machine has no usable CUDA device; "
                              "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    elif device.type != "cpu":
        raise DeviceError(f"--device {name}: moefuse runs on cpu or cuda, not {device.type}")
    return device
