"""`moefuse merge --device cuda` (Triton kernels, pinned staging, side-stream copies) gives the
same checkpoint as the CPU path. Needs a CUDA GPU; skipped without one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from moefuse.merge import merge_checkpoints
from tests.checkpoints import save_variants
from tests.helpers import assert_merge_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("method,parameters", [("ties", {"density": 0.4, "weight": 0.6}), ("task_arithmetic", {"weight": 0.5}),
                                               ("dare_ties", {"density": 0.5, "weight": 0.5})])
def test_cuda_merge_equals_cpu_merge(tmp_path, method, parameters):
    folders = save_variants(tmp_path / "in", "llama", 3, shard_size="1GB")
    config = {"merge_method": method, "base_model": str(folders[0]),
              "models": [{"model": str(f), "parameters": parameters} for f in folders[1:]]}
    merge_checkpoints(config, tmp_path / "cpu", progress=False, device="cpu")
    merge_checkpoints(config, tmp_path / "cuda", progress=False, device="cuda")
    cpu, cuda = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda" / "model.safetensors")
    assert set(cpu) == set(cuda)
    for key in cpu:
        assert_merge_close(cuda[key], cpu[key])
