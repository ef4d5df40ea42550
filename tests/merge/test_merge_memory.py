"""Peak resident memory of a checkpoint merge stays near (models + 3) x the largest tensor,
whatever the checkpoint size (here the inputs total 16x the bound)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

TENSOR_NUMEL = 1 << 20  # 4 MB in fp32
TENSORS_PER_MODEL = 24
SHARDS = 4
FIXED_OVERHEAD = 64 * 2**20


def _synthetic_checkpoint(folder: Path, seed: int) -> None:
    """A sharded checkpoint of TENSORS_PER_MODEL fp32 tensors with an index, no model class."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    keys = [f"model.layers.{i}.mlp.weight" for i in range(TENSORS_PER_MODEL)]
    per_shard = TENSORS_PER_MODEL // SHARDS
    weight_map = {}
    for shard in range(SHARDS):
        name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        chunk = keys[shard * per_shard:(shard + 1) * per_shard]
        save_file({k: torch.randn(TENSOR_NUMEL, generator=generator) for k in chunk}, folder / name)
        weight_map.update({k: name for k in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": TENSORS_PER_MODEL}))


MEASURE = """
import sys, torch, moefuse
from moefuse.merge import merge_checkpoints
def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field))
moefuse.merge_tensors(torch.zeros(8), [torch.ones(8)], 'ties', density=0.5)  # start thread pools
with open('/proc/self/clear_refs', 'w') as refs:
    refs.write('5')
baseline = rss('VmRSS')
merge_checkpoints(sys.argv[1], sys.argv[2], progress=False)
print(rss('VmHWM') - baseline)
"""


def test_peak_rss_is_bounded_by_a_few_tensors(tmp_path):
    folders = []
    for index in range(4):
        _synthetic_checkpoint(tmp_path / f"m{index}", seed=index)
        folders.append(tmp_path / f"m{index}")
    config = {"merge_method": "ties", "base_model": str(folders[0]),
              "models": [{"model": str(f), "parameters": {"density": 0.3, "weight": 0.5}} for f in folders[1:]]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "merge.yml"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.strip().splitlines()[-1])
    tensor_bytes = TENSOR_NUMEL * 4
    bound = (len(folders) - 1 + 3) * tensor_bytes + FIXED_OVERHEAD  # inputs, 2 outputs
    total_inputs = len(folders) * TENSORS_PER_MODEL * tensor_bytes
    assert peak <= bound, f"peak RSS grew by {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB (inputs {total_inputs / 2**20:.0f} MiB)"
    assert (tmp_path / "out" / "model.safetensors").exists() or (tmp_path / "out" / "model.safetensors.index.json").exists()
