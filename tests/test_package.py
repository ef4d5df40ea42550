"""The package imports without a GPU, and the README's setup builds the C++ extension."""

import os
import subprocess
import sys

import pytest

import moefuse
from moefuse.ops import backends


def test_import_without_gpu_or_extension():
    """`import moefuse` must not need CUDA, Triton or the compiled extension."""
    code = (
        "import sys; sys.modules['moefuse._C'] = None; sys.modules['triton'] = None\n"
        "import moefuse, torch\n"
        "b = torch.ones(4); print(moefuse.merge_tensors(b, [b * 2], 'task_arithmetic').tolist())"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[2.0, 2.0, 2.0, 2.0]"


def test_extension_is_built():
    if os.environ.get("MOEFUSE_ALLOW_MISSING_EXTENSION") == "1":
        pytest.skip("MOEFUSE_ALLOW_MISSING_EXTENSION=1")
    assert backends.available("cpu"), backends.cpu_unavailable_reason()


def test_every_method_is_documented():
    for spec in moefuse.methods.all_methods():
        assert spec.doc and "out" in spec.doc, spec.name
        for param in spec.params:
            assert param.doc, (spec.name, param.name)
