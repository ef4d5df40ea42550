"""Peak resident memory of a checkpoint merge stays near (models + 1 + WRITES_IN_FLIGHT) x the
largest tensor, or x one piece for tensors larger than a piece, whatever the checkpoint or tensor
size (here the inputs total 16x to 70x the bound); DELLA and filter-wise Model Stock stay near
their row blocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from moefuse.merge.run import WRITES_IN_FLIGHT
from moefuse.ops.merge import torch_scratch_bytes

SHARDS = 3
FIXED_OVERHEAD = 64 * 2**20


def _synthetic_checkpoint(folder: Path, seed: int, shape, tensors: int) -> None:
    """A sharded checkpoint of `tensors` fp32 tensors with an index, no model class."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    keys = [f"model.layers.{i}.mlp.weight" for i in range(tensors)]
    per_shard = -(-tensors // SHARDS)
    weight_map = {}
    for shard in range(SHARDS):
        name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        chunk = keys[shard * per_shard:(shard + 1) * per_shard]
        save_file({k: torch.randn(shape, generator=generator) for k in chunk}, folder / name)
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


def _peak_rss_growth(tmp_path: Path, method: str, parameters: dict, shape, tensors: int, piece_entries: int,
                     global_parameters=None) -> int:
    folders = []
    for index in range(4):
        _synthetic_checkpoint(tmp_path / f"m{index}", index, shape, tensors)
        folders.append(tmp_path / f"m{index}")
    config = {"merge_method": method, "base_model": str(folders[0]),
              "models": [{"model": str(f), "parameters": parameters} for f in folders[1:]],
              "parameters": global_parameters or {}}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "merge.yml"), str(tmp_path / "out"), str(piece_entries)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("numel, tensors, piece_entries", [
    (1 << 20, 24, 1 << 22),  # 4 MB tensors, each merged as one piece
    (1 << 23, 3, 1 << 18),  # 32 MB tensors in 1 MB pieces
], ids=["whole-tensors", "pieces"])
def test_peak_rss_is_bounded_by_a_few_pieces(tmp_path, numel, tensors, piece_entries):
    peak = _peak_rss_growth(tmp_path, "ties", {"density": 0.3, "weight": 0.5}, (numel,), tensors, piece_entries)
    piece_bytes = min(numel, piece_entries) * 4
    bound = (4 + 1 + WRITES_IN_FLIGHT) * piece_bytes + FIXED_OVERHEAD  # base + 3 inputs, output pieces
    total_inputs = 4 * tensors * numel * 4
    assert peak <= bound, (f"peak RSS grew by {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB "
                           f"(inputs {total_inputs / 2**20:.0f} MiB)")


@pytest.mark.parametrize("method, parameters, global_parameters", [
    ("della", {"density": 0.5, "epsilon": 0.1, "weight": 0.5}, {}),
    ("model_stock", {}, {"filter_wise": True}),
], ids=["della", "model_stock-filter_wise"])
def test_row_local_methods_stay_near_their_row_blocks(tmp_path, method, parameters, global_parameters):
    """Three 32 MB [2048, 4096] fp32 tensors per model: merged whole, the reference alone would
    allocate several hundred MB; in blocks of rows the growth stays near the fused methods'."""
    from moefuse.ops import rowwise

    peak = _peak_rss_growth(tmp_path, method, parameters, (2048, 4096), 3, 1 << 18, global_parameters)
    # Per block: 4 fp32 inputs and the outputs, plus the reference's temporaries per input, or (the
    # C++ kernels, blocks of FUSED_BLOCK_ENTRIES) DELLA's masks and its kept bits of the tensor.
    data = (4 + 1 + WRITES_IN_FLIGHT) * 4
    reference = rowwise.ROW_BLOCK_ENTRIES * (data + 4 * rowwise.REFERENCE_BYTES_PER_ENTRY)
    della_masks = 3 * rowwise.FUSED_BYTES_PER_ENTRY * rowwise.FUSED_BLOCK_ENTRIES + 3 * 2048 * 4096 // 8
    fused = rowwise.FUSED_BLOCK_ENTRIES * data + (della_masks if method == "della" else 0)
    bound = rowwise.blocks_in_flight() * max(reference, fused) + FIXED_OVERHEAD
    assert peak <= bound, f"peak RSS grew by {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


@pytest.mark.parametrize("method, parameters, global_parameters", [
    ("sce", {}, {"select_topk": 0.3}),
    ("multislerp", {"weight": 1.0}, {}),
], ids=["sce", "multislerp"])
def test_torch_operation_and_spherical_merges_stream_pieces(tmp_path, method, parameters, global_parameters):
    """SCE's four passes (and a spherical merge's two) read 32 MB tensors in 1 MB pieces: the growth
    stays near the pieces plus their temporaries (`torch_scratch_bytes`)."""
    piece_entries = 1 << 18
    peak = _peak_rss_growth(tmp_path, method, parameters, (1 << 23,), 3, piece_entries, global_parameters)
    scratch = torch_scratch_bytes(method, 3, {**global_parameters, **parameters}, (1 << 23,))
    bound = (4 + 1 + WRITES_IN_FLIGHT) * 4 * piece_entries + scratch + FIXED_OVERHEAD
    assert peak <= bound, f"peak RSS grew by {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
