"""compress-moe: permuted-copy experts compress to one expert with the same logits; a tiny trained
MoE stays loadable and generates; grouping and merging follow the routing statistics; bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from moefuse.cli import main as cli_main
from moefuse.errors import MoefuseError, MoeInputError
from moefuse.moe.align import SwiGLU, permute_ffn
from moefuse.moe.compress import (RoutingStats, compress_moe, compress_moe_model, find_moe_layers, group_experts,
                                  merge_group)
from tests.moe.tiny_models import VOCAB_SIZE, WORDS, word_tokenizer

EXPERTS = 4
TEXT = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(600))


def _config(family: str, top_k: int = 2):
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB_SIZE, max_position_embeddings=64, num_experts_per_tok=top_k,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=96, num_local_experts=EXPERTS, **common)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(moe_intermediate_size=96, intermediate_size=128, num_experts=EXPERTS,
                                           norm_topk_prob=True, head_dim=16, **common)
    return transformers.Qwen2MoeConfig(moe_intermediate_size=96, intermediate_size=128, num_experts=EXPERTS,
                                       shared_expert_intermediate_size=80, norm_topk_prob=True, **common)


def _model(family: str, seed: int = 0, permuted_copies: bool = False):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        for layer in find_moe_layers(model):
            experts = layer.experts
            experts.gate_up_proj.normal_(0, 0.1)
            experts.down_proj.normal_(0, 0.1)
            layer.router.weight.normal_(0, 0.5)
            if permuted_copies:
                one = SwiGLU.from_fused(experts.gate_up_proj[0], experts.down_proj[0])
                for e in range(1, EXPERTS):
                    copy = permute_ffn(one, torch.randperm(one.width))
                    experts.gate_up_proj[e] = copy.fused()
                    experts.down_proj[e] = copy.down
    return model


def _save(model, folder):
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _ids(count: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 3 + len(WORDS), (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("keep", [1, 2])
def test_permuted_copies_compress_without_changing_logits(tmp_path, calibration_file, family, keep):
    model = _model(family, permuted_copies=True)
    source = _save(model, tmp_path / "source")
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = compress_moe(source, tmp_path / "out", keep, calibration_text=calibration_file, seq_len=32)
    config = json.loads((out / "config.json").read_text())
    assert config.get("num_local_experts", config.get("num_experts")) == keep
    assert config["num_experts_per_tok"] == min(2, keep)
    compressed = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert compressed.model.layers[0].mlp.experts.gate_up_proj.shape == (keep, 192, 64)
    with torch.no_grad():
        logits = compressed(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_tiny_trained_moe_compresses_loads_and_generates(tmp_path, calibration_file):
    model = _model("mixtral", seed=1)
    tokenizer = word_tokenizer()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :384].reshape(12, 32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, "the tiny MoE did not train"
    model.eval()
    source = _save(model, tmp_path / "trained")
    out = compress_moe(source, tmp_path / "half", 2, calibration_text=calibration_file, seq_len=32)
    compressed = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert compressed.config.num_local_experts == 2
    prompt = tokenizer("the king and the", return_tensors="pt")["input_ids"]
    generated = compressed.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 8)
    with torch.no_grad():
        loss = compressed(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and float(loss) < losses[0], "compression destroyed the trained model"


def test_groups_follow_frequency_and_router_similarity():
    # experts 0 and 3 are used most; 1's logits track 3's, 2's track 0's
    logits = torch.tensor([[5.0, -1.0, 4.0, 0.0], [0.0, 3.0, 0.2, 3.5], [4.0, 0.0, 3.0, 1.0],
                           [0.0, 2.0, 0.0, 2.5]], dtype=torch.float64)
    stats = RoutingStats(torch.tensor([10.0, 2.0, 3.0, 9.0], dtype=torch.float64), logits.t() @ logits)
    assert group_experts(stats, 2) == [[0, 2], [3, 1]]
    assert group_experts(stats, 3) == [[0], [2], [3, 1]]


def test_merge_group_aligns_then_weights_by_frequency():
    generator = torch.Generator().manual_seed(0)
    a = SwiGLU(*(torch.randn(s, generator=generator) for s in ((24, 8), (24, 8), (8, 24))))
    b = SwiGLU(*(t + 0.05 * torch.randn(t.shape, generator=generator) for t in a))
    shuffle = torch.randperm(24, generator=generator)
    merged = merge_group([a, permute_ffn(b, shuffle)], torch.tensor([3.0, 1.0]))
    for part in range(3):
        torch.testing.assert_close(merged[part], 0.75 * a[part] + 0.25 * b[part])
    never_routed = merge_group([a, permute_ffn(b, shuffle)], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(never_routed.gate, 0.5 * (a.gate + b.gate))


def test_lower_level_api_on_a_loaded_model():
    model = _model("qwen3_moe", seed=2)
    groups = compress_moe_model(model, 3, _ids(4, 16))
    assert len(groups) == 2 and all(sorted(sum(g, [])) == list(range(EXPERTS)) for g in groups)
    assert model.config.num_experts == 3
    with torch.no_grad():
        assert model(input_ids=_ids()).logits.shape == (2, 24, VOCAB_SIZE)


@pytest.mark.parametrize("bad", [0, -1, EXPERTS, EXPERTS + 1, 1.5])
def test_bad_expert_counts(tmp_path, calibration_file, bad):
    source = _save(_model("mixtral"), tmp_path / "source")
    with pytest.raises(MoeInputError, match=r"num_experts must be an integer in \[1, 3\]"):
        compress_moe(source, tmp_path / "out", bad, calibration_text=calibration_file)
    assert not (tmp_path / "out").exists()


def test_bad_models_and_calibration(tmp_path, calibration_file):
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB_SIZE))
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(MoeInputError, match="'llama' is not a sparse MoE"):
        compress_moe(tmp_path / "dense", tmp_path / "out", 1, calibration_text=calibration_file)
    with pytest.raises(MoefuseError, match="model folder .*missing does not exist"):
        compress_moe(tmp_path / "missing", tmp_path / "out", 1, calibration_text=calibration_file)
    source = _save(_model("mixtral"), tmp_path / "source")
    with pytest.raises(MoefuseError, match="nothing.txt does not exist"):
        compress_moe(source, tmp_path / "out", 1, calibration_text=tmp_path / "nothing.txt")
    with pytest.raises(MoeInputError, match="exactly one"):
        compress_moe(source, tmp_path / "out", 1)
    with pytest.raises(MoeInputError, match="integer tensor"):
        compress_moe(source, tmp_path / "out", 1, calibration_ids=torch.rand(2, 8))
    assert not (tmp_path / "out").exists()
    with pytest.raises(MoefuseError, match=f"output folder {source} is the input {source}"):
        compress_moe(source, source, 1, calibration_text=calibration_file, overwrite=True)
    assert (source / "config.json").is_file()


def test_cli(tmp_path, calibration_file, capsys):
    source = _save(_model("mixtral", permuted_copies=True), tmp_path / "source")
    assert cli_main(["compress-moe", str(source), str(tmp_path / "out"), "--experts", "2",
                     "--calibration", str(calibration_file), "--seq-len", "32"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 2
    assert cli_main(["compress-moe", str(source), str(tmp_path / "out"), "--experts", "2",
                     "--calibration", str(calibration_file)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("seq-len 0", "--max-tokens (max_tokens) and --seq-len (seq_len) must be >= 1, got 8192 and 0"),
    ("max-tokens -5", "--max-tokens (max_tokens) and --seq-len (seq_len) must be >= 1, got -5 and 512"),
    ("bad config json", "config.json is not valid JSON"),
    ("no weights", "has no safetensors weights"),
    ("unknown model_type", "transformers cannot read"),
    ("latin-1 calibration", "calibration text {calibration} is not UTF-8 text"),
])
def test_bad_options_and_folders_are_named(tmp_path, calibration_file, capsys, case, message):
    source = _save(_model("mixtral"), tmp_path / "source")
    options = {"seq-len 0": ["--seq-len", "0"], "max-tokens -5": ["--max-tokens", "-5"]}.get(case, [])
    if case == "bad config json":
        (source / "config.json").write_text("{not json")
    elif case == "no weights":
        (source / "model.safetensors").unlink()
    elif case == "unknown model_type":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    elif case == "latin-1 calibration":
        calibration_file.write_bytes("caf\xe9".encode("latin-1"))
    assert cli_main(["compress-moe", str(source), str(tmp_path / "out"), "--experts", "1",
                     "--calibration", str(calibration_file), *options]) == 2
    assert message.format(calibration=calibration_file) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_calibration_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(MoeInputError, match=rf"calibration input_ids must lie in \[0, {VOCAB_SIZE}\)"):
        compress_moe_model(_model("mixtral"), 1, torch.tensor([[5, VOCAB_SIZE, 7]]))
