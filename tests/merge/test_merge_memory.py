"""Peak resident memory of a checkpoint merge stays near (models + 3) x the largest tensor, or
x one piece for tensors larger than a piece, whatever the checkpoint or tensor size (here the
inputs total 16x to 70x the bound)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

SHARDS = 3
FIXED_OVERHEAD = 64 * 2**20


def _synthetic_checkpoint(folder: Path, seed: int, numel: int, tensors: int) -> None:
    """A sharded checkpoint of `tensors` fp32 tensors with an index, no model class."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    keys = [f"model.layers.{i}.mlp.weight" for i in range(tensors)]
    per_shard = -(-tensors // SHARDS)
    weight_map = {}
    for shard in range(SHARDS):
        name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        chunk = keys[shard * per_shard:(shard + 1) * per_shard]
        save_file({k: torch.randn(numel, generator=generator) for k in chunk}, folder / name)
        weight_map.update({k: name for k in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": tensors}))


MEASURE = """
import sys, torch, moefuse
from moefuse.merge import merge_checkpoints, run
run.PIECE_ENTRIES = int(sys.argv[3])
def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field))
moefuse.merge_tensors(torch.zeros(8), [torch.ones(8)], 'ties', density=0.5)  # start thread pools
with open('/proc/self/clear_refs', 'w') as refs:
    refs.write('5')
baseline = rss('VmRSS')
merge_checkpoints(sys.argv[1], sys.argv[2], progress=False)
print(rss('VmHWM') - baseline)
"""


@pytest.mark.parametrize("numel, tensors, piece_entries", [
    (1 << 20, 24, 1 << 22),  # 4 MB tensors, each merged as one piece
    (1 << 23, 3, 1 << 18),  # 32 MB tensors in 1 MB pieces
], ids=["whole-tensors", "pieces"])
def test_peak_rss_is_bounded_by_a_few_pieces(tmp_path, numel, tensors, piece_entries):
    folders = []
    for index in range(4):
        _synthetic_checkpoint(tmp_path / f"m{index}", index, numel, tensors)
        folders.append(tmp_path / f"m{index}")
    config = {"merge_method": "ties", "base_model": str(folders[0]),
              "models": [{"model": str(f), "parameters": {"density": 0.3, "weight": 0.5}} for f in folders[1:]]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "merge.yml"), str(tmp_path / "out"), str(piece_entries)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.strip().splitlines()[-1])
    piece_bytes = min(numel, piece_entries) * 4
    bound = (len(folders) + 2) * piece_bytes + FIXED_OVERHEAD  # base + 3 inputs, 2 output pieces
    total_inputs = len(folders) * tensors * numel * 4
    assert peak <= bound, f"peak RSS grew by {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB (inputs {total_inputs / 2**20:.0f} MiB)"
    assert (tmp_path / "out" / "model.safetensors").exists() or (tmp_path / "out" / "model.safetensors.index.json").exists()
