"""Heterogeneous MoEs (`moefuse_hetero`, MergeME): built from tiny dense causal LMs of different
families, widths and depths (a llama of hidden 64 with 2 layers, a qwen2 of hidden 96 with 3
layers), checked against those dense models; save/load, generation with per-expert caches and
left padding, perplexity routing, the routing formulas and bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import moefuse
from moefuse.errors import MoefuseError, MoeInputError
from moefuse.moe.config import MoeConfigError
from moefuse.moe.modeling_hetero import (
    MoefuseHeteroCache,
    MoefuseHeteroConfig,
    MoefuseHeteroForCausalLM,
    learned_routing,
    sequence_load_balancing_loss,
)
from moefuse.moe.modeling_moefuse import perplexity_routing
from tests.helpers import assert_close_fp32
from tests.moe.helpers import assert_left_padded_batch_matches_alone, greedy, torch_threads
from tests.moe.tiny_models import SPECIAL, WORDS, save_dense_models, tiny_dense_config

SHAPES = {"llama": dict(hidden=64, layers=2), "qwen2": dict(hidden=96, layers=3)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (thread synchronization dominates); restored afterwards."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Folders of the two dense experts: llama (hidden 64, 2 layers, own head) and qwen2 (hidden 96,
    3 layers, tied head), sharing the word tokenizer."""
    root = tmp_path_factory.mktemp("hetero-dense")
    llama = save_dense_models(root, "llama", count=1, seed=1, **SHAPES["llama"])[0]
    qwen2 = save_dense_models(root, "qwen2", count=1, seed=2, tied=True, **SHAPES["qwen2"])[0]
    return {"llama": llama, "qwen2": qwen2}


def build(root, experts, **keys):
    return moefuse.build_hetero_moe({"mode": "heterogeneous", "experts": [str(e) for e in experts], **keys},
                                    root, progress=False)


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def one_hot(e: int, batch: int, experts: int = 2) -> torch.Tensor:
    return F.one_hot(torch.full((batch,), e), experts).float()


@pytest.mark.parametrize("family, projector", [("llama", "linear"), ("qwen2", "mlp")])
def test_one_expert_of_the_same_width_reproduces_the_expert(dense, tmp_path, family, projector):
    expert = load(dense[family])
    model = load(build(tmp_path / "moe", [dense[family]], projector=projector))
    assert isinstance(model, MoefuseHeteroForCausalLM) and model.config.hidden_size == SHAPES[family]["hidden"]
    ids = tokens(2, 7, seed=1)
    with torch.no_grad():
        out = model(ids)
        assert torch.equal(out.routing_weights, torch.ones(2, 1))
        assert_close_fp32(out.logits, expert(ids).logits)
    assert torch.equal(greedy(model, ids), greedy(expert, ids))


def test_forced_routing_reproduces_each_expert_with_its_own_tables(dense, tmp_path):
    experts = [dense["llama"], dense["qwen2"]]
    denses = [load(folder) for folder in experts]
    ids = tokens(2, 8, seed=2)
    with torch.no_grad():
        expected = [d(ids).logits for d in denses]
        for e in range(2):
            model = load(build(tmp_path / str(e), experts, experts_per_token=2, shared_embeddings=e))
            assert model.config.hidden_size == 96
            logits = model(ids, routing_weights=one_hot(e, 2)).logits
            assert_close_fp32(logits, expected[e])
            assert (logits - expected[1 - e]).abs().max() > 1e-2  # the experts differ: the match is not trivial
        # MergeME's averaged tables: expert e no longer sees its own embedding and head, so the match is gone
        averaged = load(build(tmp_path / "average", experts, experts_per_token=2))
        for e in range(2):
            assert (averaged(ids, routing_weights=one_hot(e, 2)).logits - expected[e]).abs().max() > 1e-3


def test_builder_writes_padded_averages_and_exact_projectors(dense, tmp_path):
    folder = build(tmp_path / "moe", [dense["llama"], dense["qwen2"]], experts_per_token=2, projector="mlp",
                   projector_hidden_size=32)
    written = load_file(str(folder / "model.safetensors"))
    llama, qwen2 = load(dense["llama"]).state_dict(), load(dense["qwen2"]).state_dict()
    embed_l, embed_q = llama["model.embed_tokens.weight"], qwen2["model.embed_tokens.weight"]
    padded = torch.zeros(128, 96)
    padded[:, :64] = embed_l
    torch.testing.assert_close(written["model.embed_tokens.weight"], (padded + embed_q) / 2, rtol=0, atol=0)
    head = torch.zeros(128, 96)
    head[:, :64] = llama["lm_head.weight"]
    torch.testing.assert_close(written["lm_head.weight"], (head + embed_q) / 2, rtol=0, atol=0)  # qwen2 is tied
    assert torch.equal(written["model.projectors_in.0.weight"], torch.eye(64, 96))
    assert torch.equal(written["model.projectors_out.0.weight"], torch.eye(96, 64))
    up = written["model.projectors_in.1.up_weight"]
    assert up.shape == (32, 96) and up.std() > 0
    assert not written["model.projectors_out.1.down_weight"].any()
    assert written["model.router.weight"].shape == (2, 96)
    for key, tensor in qwen2.items():
        if key.startswith(("model.layers.", "model.norm.")):
            assert torch.equal(written["model.experts.1." + key[len("model."):]], tensor), key
    assert "model.experts.0.embed_tokens.weight" not in written
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "moefuse_hetero" and config["architectures"] == ["MoefuseHeteroForCausalLM"]
    assert [c["model_type"] for c in config["expert_configs"]] == ["llama", "qwen2"]
    assert (folder / "tokenizer.json").exists()
    plan = moefuse.build_hetero_moe({"mode": "heterogeneous", "experts": [str(dense["llama"])]}, tmp_path / "no",
                                    dry_run=True)
    assert "model.projectors_in.0.weight [64, 64]" in plan and not (tmp_path / "no").exists()


def test_save_load_roundtrip(dense, tmp_path):
    source = build(tmp_path / "in", [dense["llama"], dense["qwen2"]], experts_per_token=2, projector="mlp")
    model = load(source)
    sharded = moefuse.build_hetero_moe({"mode": "heterogeneous", "experts": [str(dense["llama"]), str(dense["qwen2"])],
                                        "experts_per_token": 2, "projector": "mlp"}, tmp_path / "sharded",
                                       max_shard_size="60KB", progress=False)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    sharded_state = load(sharded).state_dict()
    assert all(torch.equal(sharded_state[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "out")
    written, saved = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / "out/model.safetensors"))
    assert sorted(saved) == sorted(written)
    for key, tensor in written.items():
        assert torch.equal(saved[key], tensor), key
    reloaded = load(tmp_path / "out")
    assert reloaded.config.expert_configs == model.config.expert_configs
    assert {"LlamaDecoderLayer", "Qwen2DecoderLayer"} <= reloaded._no_split_modules  # for device_map="auto"
    ids = tokens(2, 6, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("routing", ["learned", "perplexity"])
def test_generate_with_cache_equals_without(dense, tmp_path, routing):
    model = load(build(tmp_path / "moe", [dense["qwen2"], dense["llama"]], experts_per_token=2, routing=routing))
    ids = tokens(2, 6, seed=4)
    mixed = torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    cached = greedy(model, ids, routing_weights=mixed)
    assert torch.equal(cached, greedy(model, ids, routing_weights=mixed, use_cache=False))
    # routing found on the prompt is kept for the whole generation
    assert torch.equal(greedy(model, ids), greedy(model, ids, routing_weights=model.route(ids), use_cache=False))


@pytest.mark.parametrize("routing", ["learned", "perplexity"])
def test_batched_left_padding_equals_unbatched(dense, tmp_path, routing):
    model = load(build(tmp_path / "moe", [dense["llama"], dense["qwen2"]], experts_per_token=2, routing=routing))
    assert_left_padded_batch_matches_alone(model, [tokens(1, 5, seed=5)[0], tokens(1, 8, seed=6)[0]])


def test_cache_holds_one_cache_per_expert(dense, tmp_path):
    experts = [dense["llama"], dense["qwen2"]]
    model = load(build(tmp_path / "moe", experts, experts_per_token=2, shared_embeddings=1))
    qwen2 = load(dense["qwen2"])
    ids = tokens(2, 6, seed=7)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0 left-padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = MoefuseHeteroCache(model.config)
    assert [len(c.layers) for c in cache.experts] == [2, 3] and len(cache.layers) == 5
    with torch.no_grad():
        out = model(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], cache=cache,
                    use_cache=True, routing_weights=one_hot(1, 2))
        assert out.cache is cache
        assert [layer.get_seq_length() for layer in cache.layers] == [0, 0, 5, 5, 5]  # only expert 1 ran
        step = model(ids[:, 5:], attention_mask=mask, position_ids=positions[:, 5:], cache=cache, use_cache=True)
        expected = qwen2(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        assert_close_fp32(step.logits[:, -1], expected)
    assert cache.get_seq_length() == 6
    cache.routing_weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(cache.routing_weights, torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert cache.experts[1].layers[0].keys.shape[0] == 2


def test_perplexity_routing_inside_the_moe_with_one_experts_tables(dense, tmp_path):
    experts = [dense["llama"], dense["qwen2"]]
    model = load(build(tmp_path / "moe", experts, routing="perplexity", shared_embeddings=1,
                       routing_temperature=0.5, expert_tables=False))
    qwen2 = load(dense["qwen2"])
    torch.manual_seed(8)
    with torch.no_grad():  # text expert 1 itself writes
        text = qwen2.generate(tokens(2, 2, seed=9), max_new_tokens=10, do_sample=True, pad_token_id=0,
                              eos_token_id=None)
        own = torch.stack([qwen2(row[None], labels=row[None]).loss.exp() for row in text])
        ppl = model.expert_perplexities(text)
        torch.testing.assert_close(ppl[:, 1], own, rtol=1e-5, atol=0)
        assert ppl.argmin(dim=1).tolist() == [1, 1]
        out = model(text)
    torch.testing.assert_close(out.routing_weights, perplexity_routing(ppl, 1, 0.5))
    assert out.routing_weights.argmax(dim=1).tolist() == [1, 1]


def test_routing_formulas():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 3.5]])
    weights = learned_routing(logits, 2)
    top = torch.softmax(torch.tensor([2.0, 1.0]), dim=0)
    torch.testing.assert_close(weights[0], torch.tensor([top[0], 0.0, top[1]]))
    top = torch.softmax(torch.tensor([3.0, 3.5]), dim=0)
    torch.testing.assert_close(weights[1], torch.tensor([0.0, top[0], top[1]]))
    # two sequences both routed to expert 0 (K = 1): f = [1, 0, 0], P = mean softmax rows
    skewed = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    probabilities = torch.softmax(skewed, dim=1).mean(dim=0)
    torch.testing.assert_close(sequence_load_balancing_loss(skewed, 1), 3 * probabilities[0])
    torch.testing.assert_close(sequence_load_balancing_loss(torch.zeros(4, 3), 3), torch.tensor(1.0))


def test_learned_router_reads_the_mean_over_real_tokens(dense, tmp_path):
    model = load(build(tmp_path / "moe", [dense["llama"], dense["qwen2"]], experts_per_token=2))
    ids = tokens(1, 5, seed=10)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    embed = model.model.embed_tokens
    with torch.no_grad():
        expected = embed(ids).mean(dim=1) @ model.model.router.weight.T
        torch.testing.assert_close(model.model.router_logits(embed(padded), mask), expected)
        torch.testing.assert_close(model(padded, attention_mask=mask).router_logits, expected)


def _other_tokenizer(folder) -> None:
    """Replace the folder's tokenizer by one with the same words in another order (other ids)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS[::-1])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>")
    tokenizer.save_pretrained(folder)


def test_bad_inputs_are_refused(dense, tmp_path):
    experts = [dense["llama"], dense["qwen2"]]
    other = tmp_path / "other-tokenizer"
    shutil.copytree(dense["qwen2"], other)
    _other_tokenizer(other)
    with pytest.raises(MoeConfigError, match=r"experts\[1\] .* has a different tokenizer from experts\[0\]"):
        build(tmp_path / "a", [experts[0], other])
    classifier = transformers.LlamaForSequenceClassification(tiny_dense_config("llama"))
    classifier.config.pad_token_id = 0
    classifier.save_pretrained(tmp_path / "classifier")
    not_causal = r"experts\[1\] .* is not a causal language model .*LlamaForSequenceClassification"
    with pytest.raises(MoeConfigError, match=not_causal):
        build(tmp_path / "b", [experts[0], tmp_path / "classifier"])
    with pytest.raises(MoeConfigError, match="experts_per_token is 3 but only 2 expert"):
        build(tmp_path / "c", experts, experts_per_token=3)
    with pytest.raises(MoeConfigError, match="unknown key.*gate_mode"):
        build(tmp_path / "d", experts, gate_mode="hidden")
    with pytest.raises(MoeConfigError, match=r"shared_embeddings must be 'average' or an expert index in \[0, 1\]"):
        build(tmp_path / "e", experts, shared_embeddings=2)
    assert not any((tmp_path / name).exists() for name in "abcde")
    with pytest.raises(MoeConfigError, match="use mode: heterogeneous"):  # the homogeneous builder points here
        moefuse.build_moe({"base_model": str(experts[0]), "gate_mode": "random",
                           "experts": [{"source_model": str(e)} for e in experts]}, tmp_path / "f", progress=False)


def test_bad_configs_and_calls_raise_moefuse_errors(dense, tmp_path):
    folder = build(tmp_path / "moe", [dense["llama"], dense["qwen2"]])
    model = load(folder)
    ids = tokens(2, 5, seed=11)
    with pytest.raises(MoeInputError, match=r"routing_weights must be a tensor of shape \[batch=2, num_experts=2\]"):
        model(ids, routing_weights=torch.ones(2, 3) / 3)
    with pytest.raises(MoeInputError, match="MoefuseHeteroCache"):
        model(ids, cache=DynamicCache(), use_cache=True)
    config = json.loads((folder / "config.json").read_text())
    for change, message in [
        ({"num_experts_per_tok": 3}, r"num_experts_per_tok must be an integer in \[1, num_experts=2\]"),
        ({"routing": "hash"}, "unknown routing 'hash'"),
        ({"expert_configs": [{"model_type": "vit", "hidden_size": 64}]}, "'vit'.*not a dense causal"),
    ]:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(MoefuseError, match=message):
            AutoModelForCausalLM.from_pretrained(folder)


def test_build_moe_cli_dispatches_heterogeneous_configs(dense, tmp_path, capsys):
    from moefuse.cli import main

    config = tmp_path / "hetero.yaml"
    config.write_text(yaml.safe_dump({"mode": "heterogeneous", "experts_per_token": 1,
                                      "experts": [{"source_model": str(dense["llama"])}, str(dense["qwen2"])]}))
    assert main(["build-moe", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert isinstance(load(tmp_path / "out"), MoefuseHeteroForCausalLM)
    config.write_text(yaml.safe_dump({"mode": "mixed", "experts": [str(dense["llama"])]}))
    assert main(["build-moe", str(config), str(tmp_path / "bad"), "--quiet"]) == 2
    assert "mode 'mixed' is not supported" in capsys.readouterr().err


def test_auto_classes_know_moefuse_hetero():
    assert type(AutoConfig.for_model("moefuse_hetero")) is MoefuseHeteroConfig
    assert transformers.AutoModelForCausalLM._model_mapping[MoefuseHeteroConfig] is MoefuseHeteroForCausalLM


def test_perplexity_routing_with_the_experts_own_tables_scores_the_dense_experts(dense, tmp_path):
    experts = [dense["llama"], dense["qwen2"]]
    folder = build(tmp_path / "moe", experts, routing="perplexity", experts_per_token=2)  # averaged shared tables
    written = load_file(str(folder / "model.safetensors"))
    assert written["expert_heads.0.weight"].shape == (128, 64) and written["expert_heads.1.weight"].shape == (128, 96)
    model = load(folder)
    assert model.config.expert_tables
    denses = [load(e) for e in experts]
    text = tokens(3, 9, seed=12)
    mask = torch.ones_like(text)
    mask[0, :3] = 0
    with torch.no_grad():
        ppl = model.expert_perplexities(text, mask)
        for e, expert in enumerate(denses):
            for row in range(3):
                real = text[row, mask[row].bool()][None]
                own = expert(real, labels=real).loss.exp()
                torch.testing.assert_close(ppl[row, e], own, rtol=1e-5, atol=0)
        torch.testing.assert_close(model(text, attention_mask=mask).routing_weights, perplexity_routing(ppl, 2, 1.0))
    without = load(build(tmp_path / "shared", experts, routing="perplexity", expert_tables=False))
    assert not without.config.expert_tables and without.expert_heads is None
    assert (without.expert_perplexities(text) - model.expert_perplexities(text)).abs().max() > 1e-3


def test_beam_search_reorders_every_expert_cache(dense, tmp_path):
    experts = [dense["llama"], dense["qwen2"]]
    denses = [load(e) for e in experts]
    ids = tokens(2, 5, seed=13)
    beams = dict(num_beams=3, num_return_sequences=2)
    for e in range(2):  # forced to one expert with its own tables: the dense expert's beams
        model = load(build(tmp_path / str(e), experts, experts_per_token=2, shared_embeddings=e))
        assert torch.equal(greedy(model, ids, routing_weights=one_hot(e, 2), **beams), greedy(denses[e], ids, **beams))
    mixed = torch.tensor([[0.4, 0.6], [0.7, 0.3]])  # both experts' caches in use
    cached = greedy(model, ids, routing_weights=mixed, **beams)
    assert torch.equal(cached, greedy(model, ids, routing_weights=mixed, use_cache=False, **beams))
