"""Peak resident memory of `build-moe` stays near a few tensors (plus one decoder layer for the
`hidden` router computation), whatever the model size: here the inputs total about 20x the bound."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from tests.moe.tiny_models import VOCAB_SIZE, word_tokenizer

HIDDEN, INTERMEDIATE, LAYERS, EXPERTS = 512, 2048, 8, 4
FIXED_OVERHEAD = 64 * 2**20

MEASURE = """
import sys, torch, transformers, moefuse
from transformers.models.llama import modeling_llama
from moefuse.moe.build import build_moe
def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field))
with open('/proc/self/clear_refs', 'w') as refs:
    refs.write('5')
baseline = rss('VmRSS')
build_moe(sys.argv[1], sys.argv[2], progress=False, max_shard_size='100MB')
print(rss('VmHWM') - baseline)
"""


@pytest.fixture(scope="module")
def large_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=VOCAB_SIZE,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "m0", max_shard_size="50MB")
    word_tokenizer().save_pretrained(root / "m0")
    for index in range(1, EXPERTS):
        shutil.copytree(root / "m0", root / f"m{index}")
    return [root / f"m{i}" for i in range(EXPERTS)]


@pytest.mark.parametrize("gate_mode", ["random", "hidden"])
def test_peak_rss_is_bounded_by_a_few_tensors(large_models, tmp_path, gate_mode):
    experts = [{"source_model": str(f), "positive_prompts": [f"the king {'and the queen ' * i}"]}
               for i, f in enumerate(large_models)]
    config = {"base_model": str(large_models[0]), "gate_mode": gate_mode, "experts": experts, "dtype": "float32"}
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "moe.yml"), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.strip().splitlines()[-1])
    largest = HIDDEN * INTERMEDIATE * 4
    layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) * 4
    bound = (EXPERTS + 2) * largest + (layer if gate_mode == "hidden" else 0) + FIXED_OVERHEAD
    inputs = sum(p.stat().st_size for f in large_models for p in f.glob("*.safetensors"))
    print(f"build-moe {gate_mode}: peak RSS +{peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, inputs {inputs / 2**20:.0f} MiB")
    assert peak <= bound, f"peak RSS grew by {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB (inputs {inputs / 2**20:.0f} MiB)"
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
