"""MoEs built from the real SmolLM2-135M (offline) and its perturbed variants."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moefuse import build_moe

PROMPT = "The capital of France is"
EXPERT_PROMPTS = [["def fibonacci(n): return"], ["Once upon a time, a princess"], ["12 + 7 = 19, 3 * 4 ="]]


def _logits(folder, ids) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("gate_mode,top_k,extra", [
    ("hidden", 2, {}), ("cheap_embed", 1, {}), ("random", 2, {}),
    ("perplexity", 2, {}), ("perplexity", 1, {"separate_attention": True}),
])
def test_identical_copies_reproduce_the_real_model(smollm, tmp_path, gate_mode, top_k, extra):
    base = smollm[0]
    config = {"base_model": str(base), "gate_mode": gate_mode, "experts_per_token": top_k, **extra,
              "experts": [{"source_model": str(base), "positive_prompts": p} for p in EXPERT_PROMPTS]}
    build_moe(config, tmp_path / "moe", progress=False)
    ids = AutoTokenizer.from_pretrained(base)(PROMPT, return_tensors="pt").input_ids
    expected = _logits(base, ids)
    torch.testing.assert_close(_logits(tmp_path / "moe", ids), expected, atol=2e-4 * expected.abs().max().item(), rtol=0)


def test_moe_of_variants_loads_and_generates(smollm, tmp_path):
    config = {"base_model": str(smollm[0]), "gate_mode": "hidden", "experts_per_token": 2,
              "experts": [{"source_model": str(f), "positive_prompts": p} for f, p in zip(smollm, EXPERT_PROMPTS)],
              "shared_weights": [{"method": "dare_ties", "parameters": {"density": 0.2, "weight": 1.0, "lambda": 1.0}}]}
    build_moe(config, tmp_path / "moe", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(model).__name__ == "MixtralForCausalLM" and model.dtype == torch.bfloat16
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in text, text
