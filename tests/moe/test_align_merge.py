"""`align: true` in `moefuse merge`: a model whose FFN neurons are a permutation of another's merges
with it into the same function only when aligned; config validation and the dry-run description."""

from __future__ import annotations

import pytest
import torch
import transformers

from moefuse.errors import MergeConfigError, MoeInputError
from moefuse.merge import merge_checkpoints
from moefuse.moe.align import SwiGLU, permute_ffn


def _llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _permuted_copy(model: transformers.LlamaForCausalLM, seed: int) -> transformers.LlamaForCausalLM:
    copy = _llama(0)
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in copy.model.layers:
            mlp = layer.mlp
            ffn = permute_ffn(SwiGLU(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight),
                              torch.randperm(96, generator=generator))
            mlp.gate_proj.weight.copy_(ffn.gate)
            mlp.up_proj.weight.copy_(ffn.up)
            mlp.down_proj.weight.copy_(ffn.down)
    return copy


@pytest.fixture
def pair(tmp_path):
    a = _llama(1)
    b = _permuted_copy(a, seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    return a, tmp_path / "a", tmp_path / "b"


def _config(a, b, **extra):
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(path), "parameters": {"weight": 0.5}} for path in (a, b)],
            **extra}


def test_aligned_merge_of_permuted_copies_keeps_the_function(pair, tmp_path):
    model, a, b = pair
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    aligned = merge_checkpoints(_config(a, b, align=True), tmp_path / "aligned", progress=False)
    plain = merge_checkpoints(_config(a, b), tmp_path / "plain", progress=False)
    with torch.no_grad():
        aligned_logits = transformers.AutoModelForCausalLM.from_pretrained(aligned).eval()(input_ids=ids).logits
        plain_logits = transformers.AutoModelForCausalLM.from_pretrained(plain).eval()(input_ids=ids).logits
    torch.testing.assert_close(aligned_logits, expected, atol=1e-5, rtol=1e-5)
    assert (plain_logits - expected).abs().max() > 1e-2  # slot-by-slot averaging mixes unrelated neurons


def test_align_option_validation_and_description(pair, tmp_path):
    _, a, b = pair
    with pytest.raises(MergeConfigError, match="'align' must be true or false"):
        merge_checkpoints(_config(a, b, align="yes"), tmp_path / "out", progress=False)
    described = merge_checkpoints(_config(a, b, align=True), tmp_path / "out", dry_run=True)
    assert "align: each model's FFN neurons" in described
    assert "align: each" not in merge_checkpoints(_config(a, b), tmp_path / "out", dry_run=True)


def test_align_needs_gated_ffns(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    for name in ("x", "y"):
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / name)
    with pytest.raises(MoeInputError, match="no gated FFN"):
        merge_checkpoints(_config(tmp_path / "x", tmp_path / "y", align=True), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
