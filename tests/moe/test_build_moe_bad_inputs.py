"""Bad MoE build inputs: each gets a clear error before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from moefuse import build_moe
from moefuse.errors import MoefuseError
from tests.moe.tiny_models import SPECIAL, WORDS, save_dense_models


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return save_dense_models(tmp_path_factory.mktemp("dense"), "llama", count=2, noise=0.05)


def _config(dense, **extra):
    experts = [{"source_model": str(f), "positive_prompts": [p]} for f, p in zip(dense, ["python code", "the king"])]
    return {"base_model": str(dense[0]), "gate_mode": "hidden", "experts": experts, **extra}


def _refused(config, tmp_path, *patterns):
    with pytest.raises(MoefuseError) as raised:
        build_moe(config, tmp_path / "out", progress=False)
    message = str(raised.value)
    for pattern in patterns:
        assert pattern in message, message
    assert not (tmp_path / "out").exists()
    assert not any(".moefuse-partial" in p.name for p in tmp_path.iterdir())
    return message


def test_experts_of_another_architecture_point_to_heterogeneous_moes(dense, tmp_path):
    qwen = save_dense_models(tmp_path / "qwen", "qwen2", count=1)[0]
    config = _config(dense)
    config["experts"][1]["source_model"] = str(qwen)
    _refused(config, tmp_path, "experts[1]", "model_type qwen2 vs llama", "heterogeneous")


def test_experts_of_another_size_are_refused(dense, tmp_path):
    wide = tmp_path / "wide"
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128))
    model.save_pretrained(wide)
    shutil.copy(dense[0] / "tokenizer.json", wide / "tokenizer.json")
    config = _config(dense)
    config["experts"][0]["source_model"] = str(wide)
    _refused(config, tmp_path, "experts[0]", "hidden_size 32 vs 64", "heterogeneous")


def test_mismatched_tokenizer_is_refused(dense, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(dense[1], other)
    vocab = {token: i for i, token in enumerate(SPECIAL + list(reversed(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(other / "tokenizer.json"))
    config = _config(dense)
    config["experts"][1]["source_model"] = str(other)
    _refused(config, tmp_path, "experts[1]", "different vocabulary or tokenizer")


def test_mismatched_vocabulary_size_is_refused(dense, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(dense[1], other)
    config_path = other / "config.json"
    data = json.loads(config_path.read_text())
    data["vocab_size"] = 256
    config_path.write_text(json.dumps(data))
    config = _config(dense)
    config["experts"][1]["source_model"] = str(other)
    _refused(config, tmp_path, "vocab_size 256 vs 128")


def test_missing_prompts_for_hidden(dense, tmp_path):
    config = _config(dense)
    del config["experts"][1]["positive_prompts"]
    _refused(config, tmp_path, "experts[1]", "no positive_prompts", "gate_mode random")


def test_identical_prompts_for_every_expert(dense, tmp_path):
    config = _config(dense)
    config["experts"][1]["positive_prompts"] = config["experts"][0]["positive_prompts"]
    _refused(config, tmp_path, "same prompts")


def test_more_experts_per_token_than_experts(dense, tmp_path):
    _refused(_config(dense, experts_per_token=3), tmp_path, "experts_per_token is 3", "only 2 expert(s)")


@pytest.mark.parametrize("architecture,patterns", [
    ("deepseek", ["unknown architecture 'deepseek'", "Mixtral", "Qwen MoE", "Qwen3 MoE", "moefuse"]),
    ("qwen3", ["no output architecture fits llama models", "Qwen3 MoE takes qwen3 models"]),
])
def test_unsupported_architecture_lists_the_supported_ones(dense, tmp_path, architecture, patterns):
    _refused(_config(dense, architecture=architecture), tmp_path, *patterns)


def test_shared_experts_need_a_layout_that_has_them(dense, tmp_path):
    config = _config(dense, architecture="mixtral", shared_experts=[{"source_model": str(dense[0])}])
    _refused(config, tmp_path, "Mixtral takes llama/mistral models and 0 shared expert(s)")


@pytest.mark.parametrize("change,patterns", [
    ({"gate_mode": "learned"}, ["gate_mode 'learned'", "cheap_embed"]),
    ({"colour": "blue"}, ["unknown key(s) colour", "experts_per_token"]),
    ({"dtype": "int8"}, ["dtype: int8", "bfloat16"]),
    ({"shared_weights": [{"method": "tiez"}]}, ["tiez", "ties"]),
    ({"shared_weights": [{"method": "ties", "parameters": {"densty": 0.5}}]}, ["shared_weights[0]", "densty", "density"]),
    ({"separate_attention": True}, ["gate_mode: perplexity"]),
])
def test_bad_options_name_the_option(dense, tmp_path, change, patterns):
    _refused(_config(dense, **change), tmp_path, *patterns)


def test_missing_model_folder_and_bad_yaml(dense, tmp_path):
    config = _config(dense)
    config["experts"][1]["source_model"] = str(tmp_path / "nowhere")
    _refused(config, tmp_path, "nowhere", "does not exist")
    bad = tmp_path / "bad.yml"
    bad.write_text("base_model: [unclosed\n")
    with pytest.raises(MoefuseError, match="not valid YAML"):
        build_moe(bad, tmp_path / "out", progress=False)


def test_pickled_expert_is_refused(dense, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(dense[0] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    config = _config(dense)
    config["experts"][1]["source_model"] = str(pickled)
    _refused(config, tmp_path, "pytorch_model.bin", "safetensors")


def test_output_folder_that_is_an_input_is_refused_before_the_gates_are_computed(dense, tmp_path, monkeypatch):
    from moefuse.moe import build

    monkeypatch.setattr(build.MoeBuilder, "compute_gates", lambda self: pytest.fail("gates computed"))
    before = sorted(p.name for p in dense[1].iterdir())
    with pytest.raises(MoefuseError, match=f"output folder {dense[1]} is the input {dense[1]}"):
        build_moe(_config(dense), dense[1], progress=False, overwrite=True)
    assert sorted(p.name for p in dense[1].iterdir()) == before


@pytest.mark.parametrize("edit, pattern", [
    (lambda c, d: {**c, "experts": str(d[1])}, "'experts' must be a list (one '- ' entry per expert)"),
    (lambda c, d: {**c, "experts": {"source_model": str(d[1])}}, "'experts' must be a list"),
    (lambda c, d: {**c, "shared_experts": str(d[1])}, "'shared_experts' must be a list"),
    (lambda c, d: {"mode": "heterogeneous", "experts": str(d[1])}, "'experts' must be a list"),
    (lambda c, d: {**c, "shared_weights": [{"filter": 5, "method": "average"}]},
     "shared_weights[0].filter must be one tensor-name substring or group name, got 5"),
    (lambda c, d: {**c, "shared_weights": [{"filter": ["embeddings", "head"], "method": "average"}]},
     "shared_weights[0].filter must be one tensor-name substring"),
    (lambda c, d: {**c, "shared_weights": [{"method": "slerp"}]},
     "shared_weights[0]: method 'slerp' cannot merge the base with every expert"),
    (lambda c, d: {**c, "shared_weights": [{"method": "passthrough"}]},
     "shared_weights[0]: method 'passthrough' cannot merge the base with every expert"),
])
def test_malformed_lists_and_shared_rules_are_refused_while_parsing(dense, tmp_path, edit, pattern):
    _refused(edit(_config(dense), dense), tmp_path, pattern)
