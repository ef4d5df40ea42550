"""Test setup: Triton runs interpreted on CPU-only machines.

`TRITON_INTERPRET` must be set before triton is first imported, so it is set here, at
collection time, when no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
