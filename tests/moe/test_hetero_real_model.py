"""A heterogeneous MoE of the real SmolLM2-135M (llama, hidden 576, 30 layers) and a randomly
initialized Qwen2 of another width and depth (hidden 640, 2 layers) with SmolLM2's tokenizer."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from moefuse import build_hetero_moe
from tests.helpers import assert_close_fp32

PROMPT = "The capital of France is"


def test_forced_routing_reproduces_smollm_next_to_a_wider_qwen2(smollm, tmp_path):
    base = smollm[0]
    config = transformers.Qwen2Config(hidden_size=640, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=10, num_key_value_heads=2, vocab_size=49152,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(tmp_path / "qwen2")
    build_hetero_moe({"mode": "heterogeneous", "experts": [str(base), str(tmp_path / "qwen2")],
                      "shared_embeddings": 0, "experts_per_token": 2}, tmp_path / "moe", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    assert moe.config.hidden_size == 640
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    smollm_only = torch.tensor([[1.0, 0.0]])
    with torch.no_grad():
        assert_close_fp32(moe(ids, routing_weights=smollm_only).logits, dense(ids).logits)
        out = moe.generate(ids, max_new_tokens=4, do_sample=False, routing_weights=smollm_only)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
