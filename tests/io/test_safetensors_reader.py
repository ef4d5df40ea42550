"""CheckpointReader: tensor views of the memory map."""

from __future__ import annotations

import gc

import torch
from safetensors.torch import save_file

from moefuse.io.safetensors_reader import CheckpointReader


def test_a_tensor_view_outlives_close(tmp_path):
    """A view still held after close() (by a traceback, say) reads the file's data, not unmapped
    memory: before, close() unmapped the file under it and reading the view crashed the process."""
    weights = {"a": torch.arange(5000, dtype=torch.float32), "b": torch.ones(3, 7, dtype=torch.bfloat16)}
    save_file(weights, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    views = {key: reader.tensor(key) for key in weights}
    reader.close()
    del reader
    gc.collect()
    for key, tensor in weights.items():
        assert torch.equal(views[key], tensor)
    assert torch.equal(CheckpointReader(tmp_path).tensor("a"), weights["a"])  # a fresh reader maps it again
