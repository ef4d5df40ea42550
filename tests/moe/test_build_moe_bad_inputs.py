"""Bad MoE build inputs: each gets a clear error before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from moefuse import build_moe
from moefuse.errors import MoefuseError
from moefuse.moe.build_hetero import HeteroBuildConfig, build_hetero_moe
from moefuse.moe.config import ExpertSpec, MoeBuildConfig, MoeConfigError, SharedRule
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
     "shared_weights[0].filter must be one tensor-name substring or group name (embeddings, attention, norms, "
     "head), got 5"),
    (lambda c, d: {**c, "shared_weights": [{"filter": ["embeddings", "head"], "method": "average"}]},
     "shared_weights[0].filter must be one tensor-name substring"),
    (lambda c, d: {**c, "shared_weights": [{"method": "slerp"}]},
     "shared_weights[0]: method 'slerp' cannot merge the base with every expert"),
    (lambda c, d: {**c, "shared_weights": [{"method": "passthrough"}]},
     "shared_weights[0]: method 'passthrough' cannot merge the base with every expert"),
])
def test_malformed_lists_and_shared_rules_are_refused_while_parsing(dense, tmp_path, edit, pattern):
    _refused(edit(_config(dense), dense), tmp_path, pattern)


SHARED_METHOD_LIST = ("base, average, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, "
                      "model_stock, sce, task_arithmetic, ties")


@pytest.mark.parametrize("method, reason", [
    ("tiez", "is unknown"), ("slerp", "cannot merge the base with every expert"),
    ("passthrough", "cannot merge the base with every expert"), ("linear", "cannot merge the base with every expert"),
])
def test_shared_weights_methods_that_do_not_work_list_those_that_do(dense, tmp_path, method, reason):
    _refused(_config(dense, shared_weights=[{"method": method}]), tmp_path,
             f"shared_weights[0]: method '{method}' {reason}; shared weights take one of {SHARED_METHOD_LIST}")


def test_model_stock_shared_weights_need_two_distinct_experts(dense, tmp_path):
    config = {"base_model": str(dense[0]), "gate_mode": "random", "experts_per_token": 1,
              "experts": [str(dense[1])], "shared_weights": [{"method": "model_stock"}]}
    _refused(config, tmp_path, "shared_weights[0] (model_stock)", "needs at least 2 distinct expert model(s)", "got 1")


def _config_object(dense, **change) -> MoeBuildConfig:
    experts = [ExpertSpec(f, [p]) for f, p in zip(dense, ["python code", "the king"])]
    return MoeBuildConfig(**{"base_model": dense[0], "experts": experts, **change})


@pytest.mark.parametrize("change, pattern", [
    ({"experts_per_token": 5}, "experts_per_token is 5 but only 2 expert(s) are listed"),
    ({"experts_per_token": 0}, "experts_per_token must be a positive integer, got 0"),
    ({"gate_mode": "bogus"}, "gate_mode 'bogus' is not supported; use one of hidden"),
    ({"experts": []}, "'experts' must list at least one expert"),
    ({"experts": "/models/a"}, "experts must be a list of ExpertSpec"),
    ({"experts": [ExpertSpec("/models/a", "code"), ExpertSpec("/models/b", ["king"])]},
     "experts[0].positive_prompts must be a list of strings, got 'code'"),
    ({"shared_experts": [ExpertSpec(5)]}, "shared_experts[0].source_model must be a path"),
    ({"dtype": "bfloat16"}, "dtype must be torch.float32, torch.bfloat16, torch.float16 or None"),
    ({"seed": "1"}, "seed must be an integer"),
    ({"routing_temperature": 0}, "routing_temperature must be positive"),
    ({"shared_weights": [SharedRule(["embeddings", "head"], "average")]}, "shared_weights[0].filter must be one"),
    ({"shared_weights": [SharedRule(None, "slerp")]}, "method 'slerp' cannot merge the base with every expert"),
    ({"shared_weights": [SharedRule(None, "base", {"weight": 1})]}, "method 'base' takes no parameters"),
])
def test_a_config_object_gets_the_checks_of_a_parsed_config(dense, tmp_path, change, pattern):
    with pytest.raises(MoeConfigError) as raised:
        build_moe(_config_object(dense, **change), tmp_path / "out", progress=False)
    assert pattern in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, pattern", [
    ({"experts_per_token": 3}, "experts_per_token is 3 but only 2 expert(s) are listed"),
    ({"routing": "bogus"}, "routing 'bogus' is not supported"),
    ({"shared_embeddings": 2}, "shared_embeddings must be 'average' or an expert index in [0, 1], got 2"),
    ({"experts": "/models/a"}, "experts must be a list of model folders"),
    ({"seed": -1}, "seed must be an integer >= 0"),
])
def test_a_heterogeneous_config_object_gets_the_checks_of_a_parsed_config(dense, tmp_path, change, pattern):
    with pytest.raises(MoeConfigError) as raised:
        build_moe(HeteroBuildConfig(**{"experts": list(dense), **change}), tmp_path / "out", progress=False)
    assert pattern in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_a_valid_config_object_builds(dense, tmp_path):
    assert "expert 1: " in build_moe(_config_object(dense, gate_mode="random"), tmp_path / "out", dry_run=True)
    assert "router" in build_hetero_moe(HeteroBuildConfig(list(dense)), tmp_path / "out", dry_run=True)


def _copy_without(folder, dest, *patterns):
    """A copy of model folder `folder` at `dest` without the files matching `patterns`."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(*patterns))
    return dest


TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "chat_template*")


def test_a_base_or_expert_without_tokenizer_files_is_named(dense, tmp_path):
    bare = _copy_without(dense[0], tmp_path / "bare", *TOKENIZER_PATTERNS)
    random_gates = {**_config(dense), "gate_mode": "random"}
    _refused({**random_gates, "base_model": str(bare)}, tmp_path,
             f"the base ({bare}) has no tokenizer files (no tokenizer.json)", f"experts[0] ({dense[0]})")
    expert = _config(dense)
    expert["experts"][1]["source_model"] = str(bare)
    _refused(expert, tmp_path, f"experts[1] ({bare}) has no tokenizer files", f"the base ({dense[0]})")
    _refused({"mode": "heterogeneous", "experts": [str(bare), str(dense[1])]}, tmp_path,
             f"experts[0] ({bare}) has no tokenizer files", f"experts[1] ({dense[1]})")
    everywhere = _config(dense, base_model=str(bare))
    for entry in everywhere["experts"]:
        entry["source_model"] = str(bare)
    _refused(everywhere, tmp_path, f"base_model: {bare} has no tokenizer", "or use gate_mode random")


def test_a_model_folder_without_config_json_is_named(dense, tmp_path):
    bare = _copy_without(dense[1], tmp_path / "bare", "config.json")
    expert = _config(dense)
    expert["experts"][1]["source_model"] = str(bare)
    _refused(expert, tmp_path, f"experts[1]: {bare} has no config.json")
    _refused(_config(dense, base_model=str(bare)), tmp_path, f"base_model: {bare} has no config.json")
    _refused({"mode": "heterogeneous", "experts": [str(dense[0]), str(bare)]}, tmp_path,
             f"experts[1]: {bare} has no config.json")
