"""Test setup: Triton runs interpreted on CPU-only machines.

`TRITON_INTERPRET` must be set before triton is first imported, so it is set here, at
collection time, when no CUDA device is present.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm(tmp_path_factory):
    """The real SmolLM2-135M as a bf16 safetensors checkpoint and two perturbed variants (built
    once per test session; about 40 s)."""
    from tests.real_model import variants

    return variants(tmp_path_factory.mktemp("smollm"), 3)
