"""MoE building: `moefuse build-moe` vs `mergekit-moe` on the same config, in the same run.

Four experts (the real SmolLM2-135M, saved as bf16 safetensors, and three perturbed variants),
gate modes `hidden` (the base model runs on the prompts) and `random`. Each tool runs as its own
process; wall time and that process's peak RSS (wait4) are recorded.

Run: python -m pytest benches/bench_build_moe.py
"""

from __future__ import annotations

import shutil
import sys

import pytest
import yaml

from benches.common import run_measured
from tests.real_model import variants

PROMPTS = [["def fibonacci(n): return"], ["Once upon a time, a princess"], ["12 + 7 = 19, 3 * 4 ="],
           ["The French Revolution began in"]]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-bench")
    folders = variants(root, 4)
    yield root, folders
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("gate_mode", ["hidden", "random"])
def test_build_moe(record, experts, gate_mode):
    root, folders = experts
    config = {"base_model": str(folders[0]), "gate_mode": gate_mode, "experts_per_token": 2, "dtype": "bfloat16",
              "experts": [{"source_model": str(f), "positive_prompts": p} for f, p in zip(folders, PROMPTS)]}
    config_path = root / f"{gate_mode}.yml"
    config_path.write_text(yaml.safe_dump(config))
    rows = {
        "moefuse build-moe": run_measured([sys.executable, "-m", "moefuse.cli", "build-moe", str(config_path),
                                           str(root / f"out-moefuse-{gate_mode}"), "--quiet"]),
        "mergekit-moe": run_measured(["mergekit-moe", str(config_path), str(root / f"out-mergekit-{gate_mode}"),
                                      "--device", "cpu", "--quiet"]),
    }
    output_gb = sum(p.stat().st_size for p in (root / f"out-moefuse-{gate_mode}").glob("*.safetensors")) / 1e9
    moefuse_s, moefuse_rss = rows["moefuse build-moe"]
    for tool, (seconds, rss) in rows.items():
        record("build_moe", dict(
            config=f"4 experts of SmolLM2-135M, {gate_mode} gates: {tool}", tool=tool, gate_mode=gate_mode,
            seconds=seconds, peak_rss_gb=rss / 1e9, output_gb=output_gb, moefuse_vs_tool=seconds / moefuse_s,
            rss_ratio_to_moefuse=rss / moefuse_rss,
        ))
