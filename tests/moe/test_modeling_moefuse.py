"""The `moefuse_moe` model class: invariants against the dense models it is built from, perplexity
routing, the cache, generation, save/load and bad configurations."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import moefuse
from moefuse.errors import MoefuseError, MoeInputError
from moefuse.moe.config import MoeConfigError
from moefuse.moe import sequence_routing
from moefuse.moe.modeling_moefuse import MoefuseCache, MoefuseMoeForCausalLM, perplexity_routing
from tests.helpers import assert_close_fp32
from tests.moe.helpers import assert_left_padded_batch_matches_alone, greedy
from tests.moe.moefuse_checkpoints import dense_model, noised, write_moe_checkpoint

E = 3
SEQ = 9


def load(folder, **kwargs) -> MoefuseMoeForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs).eval()
    assert isinstance(model, MoefuseMoeForCausalLM)
    return model


def one_hot(e: int, batch: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.full((batch,), e), E).float()


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


IDENTICAL_CASES = [
    (family, separate, k) for family in ("llama", "qwen3") for separate in (True, False) for k in (1, 2)
] + [("mistral", True, 2), ("mistral", False, 1), ("qwen2", True, 1), ("qwen2", False, 2)]


@pytest.mark.parametrize("family, separate_attention, k", IDENTICAL_CASES)
def test_identical_experts_reproduce_the_dense_model(tmp_path, family, separate_attention, k):
    dense = dense_model(family, seed=0)
    model = load(write_moe_checkpoint(tmp_path, [dense] * E, k, separate_attention))
    ids = tokens(2, SEQ, seed=1)
    with torch.no_grad():
        expected = dense(ids).logits
        out = model(ids)
    assert out.routing_weights.shape == (2, E)
    assert (out.routing_weights > 0).sum(dim=1).tolist() == [k, k]
    assert_close_fp32(out.logits, expected)


@pytest.mark.parametrize("family, separate_attention", [("llama", True), ("llama", False), ("qwen3", True)])
def test_one_hot_routing_reproduces_the_expert_whose_shared_layers_it_has(tmp_path, family, separate_attention):
    denses = [dense_model(family, seed=10 + e) for e in range(E)]
    ids = tokens(2, SEQ, seed=2)
    for e in range(E):
        model = load(write_moe_checkpoint(tmp_path / str(e), denses, 2, separate_attention, shared_from=e))
        with torch.no_grad():
            out = model(ids, routing_weights=one_hot(e, 2))
            expected = denses[e](ids).logits
        assert_close_fp32(out.logits, expected)
        others = [(out.logits - denses[o](ids).logits).abs().max().item() for o in range(E) if o != e]
        assert min(others) > 1e-3  # the experts differ, so the match above is not trivial


def test_perplexity_routing_prefers_the_expert_that_fits_the_text(tmp_path, monkeypatch):
    base = dense_model("llama", seed=3, initializer_range=0.2)
    experts = [noised(base, 1.0, seed=4), base, noised(base, 0.5, seed=5)]
    torch.manual_seed(6)
    with torch.no_grad():  # text the base model itself writes
        text = base.generate(tokens(2, 2, seed=7), max_new_tokens=14, do_sample=True, pad_token_id=0,
                             eos_token_id=None)
        base_ppl = [math.exp(base(row[None], labels=row[None]).loss.item()) for row in text]
    for k in (1, 2):
        model = load(write_moe_checkpoint(tmp_path / str(k), experts, k, separate_attention=True, shared_from=1))
        ppl = model.expert_perplexities(text)
        assert ppl.argmin(dim=1).tolist() == [1, 1]
        torch.testing.assert_close(ppl[:, 1], torch.tensor(base_ppl), rtol=1e-5, atol=0)
        weights = model(text).routing_weights
        assert weights.argmax(dim=1).tolist() == [1, 1]
        assert (weights > 0).sum(dim=1).tolist() == [k, k]
        torch.testing.assert_close(weights, perplexity_routing(ppl, k, 1.0))
    monkeypatch.setattr(sequence_routing, "NLL_CHUNK_LOGITS", 300)  # logits of one position at a time
    torch.testing.assert_close(model.expert_perplexities(text), ppl)


def test_perplexity_routing_formula():
    ppl = torch.tensor([[2.0, 4.0, 8.0], [5.0, 1.25, 10.0], [float("nan")] * 3])
    weights = perplexity_routing(ppl, 2, 0.5)
    top = torch.softmax(torch.tensor([1 / 2, 1 / 4]) / 0.5, dim=0)
    torch.testing.assert_close(weights[0], torch.tensor([top[0], top[1], 0.0]))
    top = torch.softmax(torch.tensor([1 / 1.25, 1 / 5]) / 0.5, dim=0)
    torch.testing.assert_close(weights[1], torch.tensor([top[1], top[0], 0.0]))
    torch.testing.assert_close(weights[2], torch.full((3,), 1 / 3))


def test_fewer_than_two_real_tokens_route_equally(tmp_path):
    denses = [dense_model("qwen2", seed=20 + e) for e in range(E)]
    model = load(write_moe_checkpoint(tmp_path, denses, 1, separate_attention=True))
    ids = tokens(2, 4, seed=8)
    mask = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
    weights = model(ids, attention_mask=mask).routing_weights
    torch.testing.assert_close(weights[0], torch.full((E,), 1 / E))
    assert (weights[1] > 0).sum().item() == 1
    torch.testing.assert_close(model(ids[:1, -1:]).routing_weights, torch.full((1, E), 1 / E))


@pytest.mark.parametrize("separate_attention", [True, False])
def test_save_load_roundtrip(tmp_path, separate_attention):
    denses = [dense_model("llama", seed=30 + e, tie_word_embeddings=True) for e in range(E)]
    source = write_moe_checkpoint(tmp_path / "in", denses, 2, separate_attention)
    model = load(source)
    model.save_pretrained(tmp_path / "out")
    written, saved = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / "out/model.safetensors"))
    assert "lm_head.weight" not in saved
    assert sorted(saved) == sorted(written)
    for key, tensor in written.items():
        assert torch.equal(saved[key], tensor), key
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["model_type"] == "moefuse_moe" and config["architectures"] == ["MoefuseMoeForCausalLM"]
    assert config["base_config"]["model_type"] == "llama"
    routing = (config["num_experts"], config["num_experts_per_tok"], config["separate_attention"])
    assert routing == (E, 2, separate_attention)
    reloaded = load(tmp_path / "out")
    ids = tokens(2, SEQ, seed=9)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding"])
@pytest.mark.parametrize("separate_attention", [True, False])
def test_generate_with_cache_equals_without(tmp_path, family, separate_attention):
    denses = [dense_model(family, seed=40 + e) for e in range(E)]
    model = load(write_moe_checkpoint(tmp_path, denses, 2, separate_attention))
    ids = tokens(2, 6, seed=10)
    mixed = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.4, 0.6]])
    cached = greedy(model, ids, routing_weights=mixed)
    assert torch.equal(cached, greedy(model, ids, routing_weights=mixed, use_cache=False))
    # perplexity routing: the weights found on the prompt are kept for the whole generation
    routed = greedy(model, ids)
    assert torch.equal(routed, greedy(model, ids, routing_weights=model.route(ids), use_cache=False))


@pytest.mark.parametrize("separate_attention", [True, False])
def test_batched_left_padding_equals_unbatched(tmp_path, separate_attention):
    denses = [dense_model("qwen3", seed=50 + e) for e in range(E)]
    model = load(write_moe_checkpoint(tmp_path, denses, 2, separate_attention))
    assert_left_padded_batch_matches_alone(model, [tokens(1, 5, seed=11)[0], tokens(1, 8, seed=12)[0]])


def test_cache_holds_one_slot_per_layer_and_expert(tmp_path):
    denses = [dense_model("llama", seed=60 + e) for e in range(E)]
    model = load(write_moe_checkpoint(tmp_path, denses, 1, separate_attention=True, shared_from=2))
    ids = tokens(2, 6, seed=13)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0 left-padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = MoefuseCache(model.config)
    out = model(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], cache=cache,
                use_cache=True, routing_weights=one_hot(2, 2))
    assert out.cache is cache and len(cache.layers) == 2 * E
    filled = [layer.get_seq_length() for layer in cache.layers]
    assert filled == [0, 0, 5, 0, 0, 5]  # only the routed expert ran
    assert cache.get_seq_length() == 5
    torch.testing.assert_close(cache.routing_weights, one_hot(2, 2))
    with torch.no_grad():  # the next token: routing from the cache, masks sized by the filled slots
        step = model(ids[:, 5:], attention_mask=mask, position_ids=positions[:, 5:], cache=cache, use_cache=True)
        expected = denses[2](ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        assert_close_fp32(step.logits[:, -1], expected)
    assert cache.get_seq_length() == 6
    cache.routing_weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(cache.routing_weights, torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))
    cache.batch_repeat_interleave(2)
    assert cache.routing_weights[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    cache.batch_select_indices(torch.tensor([3]))
    torch.testing.assert_close(cache.routing_weights, torch.tensor([[1.0, 0.0, 0.0]]))
    assert cache.layers[2].keys.shape[0] == 1


def test_beam_search_of_identical_experts_equals_the_dense_model(tmp_path):
    dense = dense_model("llama", seed=65)
    model = load(write_moe_checkpoint(tmp_path, [dense] * E, 2, separate_attention=True))
    ids = tokens(2, 5, seed=15)
    beams = dict(num_beams=3, num_return_sequences=2)
    assert torch.equal(greedy(model, ids, **beams), greedy(dense, ids, **beams))


def test_bad_inputs_raise_moefuse_errors(tmp_path):
    denses = [dense_model("llama", seed=70 + e) for e in range(E)]
    model = load(write_moe_checkpoint(tmp_path, denses, 1, separate_attention=False))
    ids = tokens(2, 5, seed=14)
    with pytest.raises(MoeInputError, match=r"routing_weights must be a tensor of shape \[batch=2, num_experts=3\]"):
        model(ids, routing_weights=torch.ones(2, 2) / 2)
    with pytest.raises(MoeInputError, match="sum to 1"):
        model(ids, routing_weights=torch.ones(2, E))
    with pytest.raises(MoeInputError, match="MoefuseCache"):
        model(ids, cache=DynamicCache(), use_cache=True)
    with pytest.raises(MoeInputError, match="needs input_ids"):
        model(inputs_embeds=torch.zeros(2, 5, 64))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts_per_tok": 4}, r"num_experts_per_tok must be an integer in \[1, num_experts=3\], got 4"),
        ({"routing": "hash"}, "unknown routing 'hash'; supported: perplexity"),
        ({"routing_temperature": 0}, "routing_temperature must be a number > 0"),
        ({"base_config": {"model_type": "gpt2"}}, "'gpt2' is not supported; supported dense families: llama, mistral"),
    ],
)
def test_bad_configs_raise_moefuse_errors(tmp_path, change, message):
    dense = dense_model("llama", seed=0)
    folder = write_moe_checkpoint(tmp_path, [dense] * E, 1, separate_attention=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(MoeConfigError, match=message) as raised:
        AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(raised.value, MoefuseError)


def test_auto_classes_know_moefuse_moe_in_either_import_order():
    assert moefuse.__version__  # this process imported moefuse before transformers' Auto modules
    assert AutoConfig.for_model("moefuse_moe").model_type == "moefuse_moe"
    script = (
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "import moefuse\n"
        "from moefuse.moe.modeling_moefuse import MoefuseMoeConfig, MoefuseMoeForCausalLM\n"
        "assert AutoModelForCausalLM._model_mapping[MoefuseMoeConfig] is MoefuseMoeForCausalLM\n"
        "assert type(AutoConfig.for_model('moefuse_moe')) is MoefuseMoeConfig\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
