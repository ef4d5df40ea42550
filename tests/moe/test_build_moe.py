"""`moefuse build-moe` on tiny dense models: invariants, layouts, shared-weight rules, streaming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from moefuse import build_moe, merge_tensors
from moefuse.cli import main as cli_main
from moefuse.io.safetensors_reader import CheckpointReader
from tests.moe.tiny_models import save_dense_models, word_tokenizer

PROMPTS = [["python code function return"], ["the king and the queen"], ["two plus three equals five"]]
TEXT = "the dragon in the castle python code two plus two"


def _experts(folders, prompts=True, **extra):
    return [
        {"source_model": str(f), **({"positive_prompts": PROMPTS[i % len(PROMPTS)]} if prompts else {}), **extra}
        for i, f in enumerate(folders)
    ]


def _logits(folder: Path, text: str = TEXT) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = word_tokenizer()(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """A llama base and two exact copies of it (noise 0)."""
    return save_dense_models(tmp_path_factory.mktemp("copies"), "llama", count=3, noise=0.0)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    return save_dense_models(tmp_path_factory.mktemp("variants"), "llama", count=3, noise=0.05)


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_copies_reproduce_the_dense_model_mixtral(copies, tmp_path, gate_mode, top_k):
    config = {"base_model": str(copies[0]), "gate_mode": gate_mode, "experts_per_token": top_k,
              "experts": _experts(copies)}
    build_moe(config, tmp_path / "moe", progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 3
    torch.testing.assert_close(_logits(tmp_path / "moe"), _logits(copies[0]), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_copies_reproduce_the_dense_model_qwen3_moe(tmp_path, top_k):
    folders = save_dense_models(tmp_path, "qwen3", count=2, noise=0.0)
    config = {"base_model": str(folders[0]), "gate_mode": "random", "experts_per_token": top_k,
              "experts": _experts(folders, prompts=False)}
    build_moe(config, tmp_path / "moe", progress=False)
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "qwen3_moe"
    torch.testing.assert_close(_logits(tmp_path / "moe"), _logits(folders[0]), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_qwen2_moe_with_shared_expert_reproduces_the_dense_model(tmp_path, architecture):
    """Routed experts' down_proj x 0.5 plus the shared expert under a zero gate (sigmoid(0) = 0.5)
    sum to the dense FFN. A llama input gets zero attention biases."""
    folders = save_dense_models(tmp_path, architecture, count=2, noise=0.0)
    config = {"base_model": str(folders[0]), "gate_mode": "hidden", "experts_per_token": 2,
              "experts": _experts(folders, residual_scale=0.5),
              "shared_experts": [{"source_model": str(folders[0])}]}
    build_moe(config, tmp_path / "moe", progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert torch.count_nonzero(moe.model.layers[0].mlp.shared_expert_gate.weight) == 0
    torch.testing.assert_close(_logits(tmp_path / "moe"), _logits(folders[0]), atol=2e-5, rtol=1e-5)


def _force_expert(model, expert: int) -> None:
    """Route every token of every layer to `expert` with weight 1."""
    for layer in model.model.layers:
        def forced(hidden_states, gate=layer.mlp.gate):
            tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
            logits = torch.zeros(tokens, gate.weight.shape[0])
            return logits, torch.ones(tokens, 1), torch.full((tokens, 1), expert)
        layer.mlp.gate.forward = forced


@pytest.mark.parametrize("expert", [0, 1, 2])
def test_forced_routing_with_shared_layers_of_model_e_reproduces_model_e(variants, tmp_path, expert):
    config = {"base_model": str(variants[expert]), "gate_mode": "random", "experts_per_token": 1,
              "experts": _experts(variants, prompts=False)}
    build_moe(config, tmp_path / "moe", progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    _force_expert(moe, expert)
    ids = word_tokenizer()(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, _logits(variants[expert]), atol=2e-5, rtol=1e-5)
        _force_expert(moe, (expert + 1) % 3)
        assert not torch.allclose(moe(ids).logits, _logits(variants[expert]), atol=1e-3)


def test_moe_saves_loads_and_generates(variants, tmp_path):
    config = {"base_model": str(variants[0]), "gate_mode": "hidden", "experts": _experts(variants), "dtype": "bfloat16"}
    build_moe(config, tmp_path / "moe", progress=False, max_shard_size="60KB")
    assert (tmp_path / "moe" / "model.safetensors.index.json").exists()
    assert (tmp_path / "moe" / "tokenizer.json").exists()
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.dtype == torch.bfloat16
    ids = word_tokenizer()(TEXT, return_tensors="pt").input_ids
    out = moe.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6)
    moe.save_pretrained(tmp_path / "resaved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(again(ids).logits, moe(ids).logits)


def test_tied_embeddings_stay_tied(tmp_path):
    folders = save_dense_models(tmp_path, "llama", count=2, tied=True, noise=0.0)
    config = {"base_model": str(folders[0]), "gate_mode": "cheap_embed", "experts": _experts(folders)}
    build_moe(config, tmp_path / "moe", progress=False)
    assert "lm_head.weight" not in CheckpointReader(tmp_path / "moe").keys()
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["tie_word_embeddings"] is True
    torch.testing.assert_close(_logits(tmp_path / "moe"), _logits(folders[0]), atol=2e-5, rtol=1e-5)


def _tensor(folder: Path, key: str) -> torch.Tensor:
    reader = CheckpointReader(folder)
    return reader.tensor(key).clone()


def test_router_rows_are_the_normalized_gate_vectors(variants, tmp_path):
    config = {"base_model": str(variants[0]), "gate_mode": "cheap_embed", "experts": _experts(variants)}
    build_moe(config, tmp_path / "moe", progress=False)
    router = _tensor(tmp_path / "moe", "model.layers.1.block_sparse_moe.gate.weight")
    assert router.shape == (3, 64)
    torch.testing.assert_close(router.norm(dim=1), torch.ones(3))
    # cheap_embed: the normalized sum of the prompt's token embeddings, the same in every layer
    embedding = _tensor(variants[0], "model.embed_tokens.weight")
    tokenizer = word_tokenizer()
    ids = tokenizer("<s>" + PROMPTS[1][0], add_special_tokens=False).input_ids
    expected = embedding[ids].sum(0)
    torch.testing.assert_close(router[1], expected / expected.norm())
    torch.testing.assert_close(_tensor(tmp_path / "moe", "model.layers.0.block_sparse_moe.gate.weight"), router)


def test_random_gates_follow_the_seed(variants, tmp_path):
    config = {"base_model": str(variants[0]), "gate_mode": "random", "seed": 7, "experts": _experts(variants, prompts=False)}
    build_moe(config, tmp_path / "a", progress=False)
    build_moe({**config, "seed": 8}, tmp_path / "b", progress=False)
    key = "model.layers.0.block_sparse_moe.gate.weight"
    expected = torch.randn((2, 3, 64), generator=torch.Generator().manual_seed(7))[0]
    torch.testing.assert_close(_tensor(tmp_path / "a", key), expected)
    assert not torch.equal(_tensor(tmp_path / "b", key), expected)


def test_expert_tensors_noise_and_residual_scale(variants, tmp_path):
    experts = _experts(variants, prompts=False)
    experts[1]["residual_scale"] = 0.25
    experts[2]["noise_scale"] = 0.01
    config = {"base_model": str(variants[0]), "gate_mode": "random", "experts": experts}
    build_moe(config, tmp_path / "moe", progress=False)
    out = tmp_path / "moe"
    for e, folder in enumerate(variants):
        gate = _tensor(out, f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight")
        down = _tensor(out, f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight")
        dense_gate = _tensor(folder, "model.layers.1.mlp.gate_proj.weight")
        dense_down = _tensor(folder, "model.layers.1.mlp.down_proj.weight")
        if e == 2:
            noise = gate - dense_gate
            assert 0.008 < noise.std().item() < 0.012 and abs(noise.mean().item()) < 2e-3
        else:
            torch.testing.assert_close(gate, dense_gate, rtol=0, atol=0)
            torch.testing.assert_close(down, dense_down * (0.25 if e == 1 else 1.0), rtol=0, atol=0)


def test_shared_weights_rules(variants, tmp_path):
    rules = [
        {"filter": "embeddings", "method": "base"},
        {"filter": "attention", "method": "ties", "parameters": {"density": 0.5, "weight": 1.0, "lambda": 1.0}},
        {"filter": "model.norm", "method": "sce", "parameters": {"select_topk": 0.5}},
        {"method": "average"},
    ]
    experts = _experts(variants[1:])
    config = {"base_model": str(variants[0]), "gate_mode": "hidden", "experts": experts, "shared_weights": rules}
    build_moe(config, tmp_path / "moe", progress=False)
    out = tmp_path / "moe"
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(_tensor(out, key), _tensor(variants[0], key), rtol=0, atol=0)
    key = "model.layers.0.self_attn.q_proj.weight"
    expected = merge_tensors(_tensor(variants[0], key), [_tensor(f, key) for f in variants[1:]], "ties",
                             density=0.5, weight=1.0, backend="reference", **{"lambda": 1.0})
    torch.testing.assert_close(_tensor(out, key), expected)
    key = "model.norm.weight"
    expected = merge_tensors(_tensor(variants[0], key), [_tensor(f, key) for f in variants[1:]], "sce",
                             select_topk=0.5, backend="reference")
    torch.testing.assert_close(_tensor(out, key), expected)
    key = "model.layers.1.post_attention_layernorm.weight"
    expected = (_tensor(variants[1], key) + _tensor(variants[2], key)) / 2
    torch.testing.assert_close(_tensor(out, key), expected)


def test_dry_run_writes_nothing_and_cli_builds(variants, tmp_path, capsys):
    config_path = tmp_path / "moe.yml"
    import yaml

    config_path.write_text(yaml.safe_dump({"base_model": str(variants[0]), "gate_mode": "random",
                                           "experts": _experts(variants, prompts=False)}))
    assert cli_main(["build-moe", str(config_path), str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "Mixtral" in printed and "expected peak memory" in printed and "block_sparse_moe.experts.2.w3" in printed
    assert not (tmp_path / "out").exists()
    assert cli_main(["build-moe", str(config_path), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "config.json").exists()
    assert cli_main(["build-moe", str(config_path), str(tmp_path / "out"), "--quiet"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


def test_failure_midway_leaves_nothing(variants, tmp_path):
    """A NaN in an expert's shared tensor stops the TIES merge of that tensor midway through the
    build: no output folder and no partial folder remain."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(variants[2], broken)
    for shard in sorted(broken.glob("*.safetensors")):
        state = load_file(shard)
        if "model.layers.1.self_attn.o_proj.weight" in state:
            state["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
            save_file(state, shard, metadata={"format": "pt"})
    config = {"base_model": str(variants[0]), "gate_mode": "random", "experts": _experts([variants[1], broken], prompts=False),
              "shared_weights": [{"method": "ties", "parameters": {"density": 0.5, "weight": 1.0}}]}
    from moefuse.errors import MoefuseError

    with pytest.raises(MoefuseError, match=f"tensor 'model.layers.1.self_attn.o_proj.weight' of {broken} holds 1 NaN"):
        build_moe(config, tmp_path / "moe", progress=False)
    assert [p.name for p in tmp_path.iterdir() if "moe" in p.name] == []



@pytest.mark.parametrize("separate_attention", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_perplexity_routed_copies_reproduce_the_dense_model(copies, tmp_path, separate_attention, top_k):
    config = {"base_model": str(copies[0]), "gate_mode": "perplexity", "separate_attention": separate_attention,
              "experts_per_token": top_k, "experts": _experts(copies, prompts=False)}
    build_moe(config, tmp_path / "moe", progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(moe).__name__ == "MoefuseMoeForCausalLM" and moe.config.separate_attention is separate_attention
    torch.testing.assert_close(_logits(tmp_path / "moe"), _logits(copies[0]), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("expert", [0, 2])
def test_separate_attention_forced_to_expert_e_reproduces_model_e(variants, tmp_path, expert):
    config = {"base_model": str(variants[expert]), "gate_mode": "perplexity", "separate_attention": True,
              "experts_per_token": 1, "experts": _experts(variants, prompts=False)}
    build_moe(config, tmp_path / "moe", progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids = word_tokenizer()(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        forced = moe(ids, routing_weights=torch.nn.functional.one_hot(torch.tensor([expert]), 3).float()).logits
    torch.testing.assert_close(forced, _logits(variants[expert]), atol=2e-5, rtol=1e-5)
    routed = moe.route(ids)  # sequence-level weights over the experts
    assert routed.shape == (1, 3) and torch.allclose(routed.sum(dim=1), torch.ones(1))


def test_perplexity_moe_generates_after_save_and_load(variants, tmp_path):
    config = {"base_model": str(variants[0]), "gate_mode": "perplexity", "experts_per_token": 2,
              "experts": _experts(variants, prompts=False),
              "shared_weights": [{"method": "ties", "parameters": {"density": 0.5, "weight": 1.0, "lambda": 1.0}}]}
    build_moe(config, tmp_path / "moe", progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    ids = word_tokenizer()(TEXT, return_tensors="pt").input_ids
    out = moe.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)


def _cast_copy(folder: Path, dest: Path, dtype: torch.dtype) -> Path:
    """A copy of model folder `folder` at `dest` with its floating tensors and config dtype in `dtype`."""
    shutil.copytree(folder, dest)
    for path in dest.glob("*.safetensors"):
        tensors = safetensors.torch.load_file(path)
        safetensors.torch.save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                                    path, metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_experts_in_another_float_dtype_are_cast_to_the_output_dtype(variants, tmp_path, dtype):
    """As mergekit-moe: an fp32 base with a bf16 expert builds (output dtype: `dtype`, else the base's),
    and equals a build from inputs cast to the output dtype beforehand, for merged, averaged and copied
    shared tensors and for the expert FFNs."""
    out_dtype = torch.bfloat16 if dtype else torch.float32
    rules = [{"filter": "attention", "method": "ties", "parameters": {"density": 0.5, "weight": 1.0}},
             {"filter": "norms", "method": "average"}]

    def build(folders, out):
        config = {"base_model": str(folders[0]), "gate_mode": "random", "experts": _experts(folders[1:], prompts=False),
                  "shared_weights": rules, **({"dtype": dtype} if dtype else {})}
        return CheckpointReader(build_moe(config, tmp_path / out, progress=False))

    inputs = [variants[0], variants[1], _cast_copy(variants[2], tmp_path / "bf16", torch.bfloat16)]
    built = build(inputs, "moe")
    expected = build([_cast_copy(f, tmp_path / f"cast-{i}", out_dtype) for i, f in enumerate(inputs)], "expected")
    assert sorted(built.keys()) == sorted(expected.keys())
    for key in built.keys():
        assert built.info(key).dtype == out_dtype, key
        assert torch.equal(built.tensor(key), expected.tensor(key)), key
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.dtype == out_dtype
    assert torch.isfinite(_logits(tmp_path / "moe")).all()
