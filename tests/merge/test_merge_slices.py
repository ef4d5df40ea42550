"""`slices` configs (mergekit's layer slices) and the passthrough method: parity with mergekit
tensor by tensor, the rewritten layer stack, loading with transformers, bad slice configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moefuse
from moefuse.errors import MergeConfigError
from moefuse.merge import merge_checkpoints
from moefuse.merge.slices import renumber
from tests.checkpoints import save_variants
from tests.merge.test_merge_checkpoints import assert_matches_mergekit


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three 4-layer fp32 llama checkpoints (base first), sharded."""
    return save_variants(tmp_path_factory.mktemp("sliced"), "llama", 3, layers=4)


def _source(folder: Path, start: int, stop: int, **parameters) -> dict:
    return {"model": str(folder), "layer_range": [start, stop], **({"parameters": parameters} if parameters else {})}


def _configs(a: Path, b: Path, c: Path) -> dict:
    """Slice configs covering: per-slice gradients and parameters, filters, a base among the
    sources, sources at different layer offsets, and a frankenmerge with a new layer count."""
    return {
        "slerp in two slices": {
            "merge_method": "slerp", "base_model": str(a),
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
            "slices": [{"sources": [_source(a, 0, 2), _source(b, 0, 2)]},
                       {"sources": [_source(a, 2, 4), _source(b, 2, 4)], "parameters": {"t": [0.2, 0.9]}}],
        },
        "ties with per-source parameters": {
            "merge_method": "ties", "base_model": str(a), "parameters": {"weight": 0.7, "density": 0.5},
            "slices": [{"sources": [_source(a, 0, 4), _source(b, 0, 4, density=[0.2, 0.8]), _source(c, 0, 4)],
                        "parameters": {"weight": 0.4}}],
        },
        "task arithmetic with a slice base": {
            "merge_method": "task_arithmetic", "parameters": {"weight": 0.5},
            "slices": [{"sources": [_source(b, 0, 1), _source(a, 0, 1)], "base_model": str(a)},
                       {"sources": [_source(c, 1, 4), _source(a, 1, 4)], "base_model": str(a)}],
        },
        "linear across layer offsets": {
            "merge_method": "linear",
            "slices": [{"sources": [_source(b, 0, 2, weight=0.3), _source(c, 2, 4, weight=0.7)]}],
        },
        "nuslerp with the base among the sources": {
            "merge_method": "nuslerp", "base_model": str(a),
            "slices": [{"sources": [_source(a, 0, 4), _source(b, 0, 4, weight=0.3), _source(c, 0, 4, weight=0.6)]}],
        },
        "karcher of three sources": {
            "merge_method": "karcher", "slices": [{"sources": [_source(a, 0, 4), _source(b, 0, 4), _source(c, 0, 4)]}],
        },
        "passthrough frankenmerge": {
            "merge_method": "passthrough",
            "slices": [{"sources": [_source(a, 0, 3)]},
                       {"sources": [_source(b, 1, 4, scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])]}],
        },
    }


def _tensors(folder: Path) -> dict:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("case", sorted(_configs(Path("a"), Path("b"), Path("c"))))
def test_slices_match_mergekit(tmp_path, models, case):
    config = {**_configs(*models)[case], "dtype": "float32"}  # mergekit computes bf16 merges in bf16
    assert_matches_mergekit(config, tmp_path, state=_tensors)
    layers = sum(piece["sources"][0]["layer_range"][1] - piece["sources"][0]["layer_range"][0]
                 for piece in config["slices"])
    assert json.loads((tmp_path / "moefuse" / "config.json").read_text())["num_hidden_layers"] == layers


def test_frankenmerge_stacks_the_source_layers_and_generates(tmp_path):
    a, b = save_variants(tmp_path / "in", "qwen2", 2, layers=4)
    config = {"merge_method": "passthrough",
              "slices": [{"sources": [_source(a, 0, 3)]}, {"sources": [_source(b, 1, 4)]}]}
    out = merge_checkpoints(config, tmp_path / "out", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 6
    assert written["layer_types"] == ["full_attention"] * 6  # one per output layer, as transformers checks
    merged = AutoModelForCausalLM.from_pretrained(out)
    first, second = (AutoModelForCausalLM.from_pretrained(folder) for folder in (a, b))
    for out_layer, (source, layer) in enumerate([(first, 0), (first, 1), (first, 2), (second, 1), (second, 2),
                                                 (second, 3)]):
        for ours, theirs in zip(merged.model.layers[out_layer].parameters(), source.model.layers[layer].parameters()):
            assert torch.equal(ours, theirs)
    assert torch.equal(merged.model.embed_tokens.weight, first.model.embed_tokens.weight)  # from the first slice
    assert torch.equal(merged.lm_head.weight, second.lm_head.weight)  # from the last slice
    assert merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_one_whole_slice_equals_the_models_form(tmp_path, models):
    a, b, c = models
    whole = {"merge_method": "ties", "base_model": str(a), "parameters": {"density": [0.3, 0.9], "weight": 0.6},
             "models": [{"model": str(b)}, {"model": str(c)}]}
    sliced = {**whole, "models": None, "slices": [{"sources": [_source(a, 0, 4), _source(b, 0, 4), _source(c, 0, 4)]}]}
    merge_checkpoints(whole, tmp_path / "models", progress=False)
    merge_checkpoints(sliced, tmp_path / "slices", progress=False)
    ours, theirs = _tensors(tmp_path / "slices"), _tensors(tmp_path / "models")
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_dry_run_lists_the_slices(tmp_path, models):
    a, b, _ = models
    text = merge_checkpoints(_configs(a, b, b)["passthrough frankenmerge"], tmp_path / "out", dry_run=True)
    assert f"slice 0: output layers 0-2 from {a} layers 0-2" in text
    assert f"slice 1: output layers 3-5 from {b} layers 1-3" in text
    assert not (tmp_path / "out").exists()


def test_passthrough_scales_in_fp32_and_rounds_once():
    x = torch.randn(37, 5).to(torch.bfloat16)
    assert torch.equal(moefuse.merge_tensors(None, [x], "passthrough"), x)
    for backend in ("cpu", "reference"):
        assert torch.equal(moefuse.merge_tensors(None, [x], "passthrough", scale=0.3, backend=backend),
                           (x.float() * 0.3).to(torch.bfloat16))


def test_renumber_replaces_only_the_layer_index():
    assert renumber("model.layers.12.mlp.layers.weight", 3) == "model.layers.3.mlp.layers.weight"


def test_residual_weight_is_ignored_as_mergekit_ignores_it(tmp_path, models):
    a, b, _ = models
    config = {"merge_method": "task_arithmetic", "base_model": str(a),
              "slices": [{"sources": [_source(a, 0, 4), _source(b, 0, 4)]}]}
    merge_checkpoints(config, tmp_path / "plain", progress=False)
    with pytest.warns(UserWarning, match=r"slices\[0\].residual_weight is ignored, as mergekit 0.1.5 ignores it"):
        merge_checkpoints({**config, "slices": [{**config["slices"][0], "residual_weight": 0.5}]}, tmp_path / "residual",
                          progress=False)
    for name in ("model.safetensors.index.json", "config.json"):
        if (tmp_path / "plain" / name).exists():
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "residual" / name).read_bytes()
    for shard in (tmp_path / "plain").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "residual" / shard.name).read_bytes()


@pytest.mark.parametrize("edit, message", [
    (lambda c, a, b: {**c, "models": [{"model": str(b)}]}, "either 'models' or 'slices', not both"),
    (lambda c, a, b: {**c, "slices": [{"sources": [_source(a, 0, 2), _source(b, 0, 3)]}]},
     r"slices\[0\] span different numbers of layers \(\[2, 3\]\)"),
    (lambda c, a, b: {**c, "slices": [{"sources": [_source(a, 2, 6), _source(b, 2, 6)]}]},
     r"slices\[0\].sources\[0\].layer_range \[2, 6\] goes past the 4 layers of"),
    (lambda c, a, b: {**c, "slices": [{"sources": [_source(a, 2, 2), _source(b, 2, 3)]}]},
     r"layer_range must be \[start, stop\] with 0 <= start < stop, got \[2, 2\]"),
    (lambda c, a, b: {**c, "slices": [{"sources": [_source(b, 0, 4)]}]},
     r"slices\[0\]: merge_method 'task_arithmetic' takes its base from the slice's sources"),
    (lambda c, a, b: {**c, "align": True}, "'align: true' works with 'models' only"),
    (lambda c, a, b: {**c, "slices": [{**c["slices"][0], "residual_weight": "half"}]},
     r"slices\[0\].residual_weight must be a number, got 'half'"),
    (lambda c, a, b: {**c, "slices": [{**c["slices"][0], "layers": 2}]},
     r"slices\[0\] has unknown key\(s\) layers; valid: sources, base_model, parameters"),
    (lambda c, a, b: {**c, "slices": [{"sources": [{"model": str(a)}]}]},
     r"slices\[0\].sources\[0\] needs 'model' and 'layer_range'"),
    (lambda c, a, b: {**c, "slices": "all"}, "'slices' must be a list of slices"),
    (lambda c, a, b: {**c, "slices": []}, "'slices' must list at least one slice"),
    (lambda c, a, b: {**c, "models": []}, "either 'models' or 'slices', not both"),
    (lambda c, a, b: {**c, "slices": [{**c["slices"][0], "parameters": {"t": 0.5}}]},
     "merge_method 'task_arithmetic' has no parameter 't'; valid parameters: weight"),
    (lambda c, a, b: {**c, "merge_method": "nuslerp", "slices": [{"sources": [_source(b, 0, 4, weight=1.0),
                                                                              _source(b, 0, 4, weight=0.5)]}]},
     r"slices\[0\]: merge_method 'nuslerp' takes its base from the slice's sources, but the base"),
    (lambda c, a, b: {"merge_method": "passthrough", "slices": c["slices"]},
     r"slices\[0\]: merge_method 'passthrough' needs exactly 1 source\(s\), got 2"),
])
def test_bad_slice_configs_are_refused_before_writing(tmp_path, models, edit, message):
    a, b, _ = models
    config = {"merge_method": "task_arithmetic", "base_model": str(a),
              "slices": [{"sources": [_source(a, 0, 4), _source(b, 0, 4)]}]}
    with pytest.raises(MergeConfigError, match=message):
        merge_checkpoints(edit(config, a, b), tmp_path / "out", progress=False)
    assert not list(tmp_path.iterdir())
