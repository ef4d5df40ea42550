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


def test_cli_merge_lets_idle_threads_sleep(tmp_path):
    """`import moefuse` does not start torch, so `moefuse merge` can still choose OpenMP's passive
    wait policy (a user's own choice is kept)."""
    code = (
        "import os, sys\n"
        "import moefuse, moefuse.cli\n"
        "print('torch' in sys.modules)\n"
        "moefuse.cli.main(['merge', sys.argv[1], sys.argv[2], '--dry-run', '--quiet'])\n"
        "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    b = tmp_path / "b"
    b.mkdir()
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = lambda env: subprocess.run([sys.executable, "-c", code, str(config), str(tmp_path / "out")],
                                     capture_output=True, text=True, env=env)
    result = run(env)
    assert result.stdout.split("\n")[:2] == ["False", "True PASSIVE"], result.stderr
    result = run(dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert result.stdout.split("\n")[1] == "True ACTIVE", result.stderr
    config.write_text(f"merge_method: nearswap\nbase_model: {b}\nparameters: {{t: 0.1}}\nmodels:\n  - model: {b}\n")
    code = code.replace("os.environ.get('OMP_WAIT_POLICY')",
                        "os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')")
    result = run(env)  # a torch-operation method: threads spin briefly, then sleep
    assert result.stdout.split("\n")[1] == "True None 30000", result.stderr
