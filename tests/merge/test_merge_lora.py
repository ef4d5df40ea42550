"""LoRA adapters applied as checkpoints are read (mergekit's MODEL+ADAPTER references), against
PEFT's merge_and_unload and mergekit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moefuse import MergeConfigError
from moefuse.io.lora import AdaptedCheckpointReader
from moefuse.io.output import OutputIsInputError
from moefuse.io.safetensors_reader import CheckpointError
from moefuse.merge import merge_checkpoints
from tests.checkpoints import save_variants
from tests.helpers import assert_merge_close, require_peer

TARGETS = ["q_proj", "v_proj", "down_proj"]
OPTIONS = {
    "plain": {},
    "rslora and patterns": {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 16}},
    "embedding and saved head": {"target_modules": TARGETS + ["embed_tokens"], "modules_to_save": ["lm_head"]},
}


def save_adapter(model_folder: Path, out: Path, seed: int = 0, **options) -> Path:
    """A PEFT LoRA adapter of the model in `model_folder` with random (non-zero) A and B."""
    peft = require_peer("peft")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False,
                                **options})
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


def peft_merged(model_folder: Path, adapter: Path, dtype: torch.dtype) -> dict:
    """PEFT's own merge of `adapter` into the model, loaded in `dtype`."""
    peft = require_peer("peft")
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return save_variants(root / "fp32", "llama", 3) + save_variants(root / "bf16", "llama", 1, dtype=torch.bfloat16)


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adapted_tensors_equal_peft_merge_and_unload(tmp_path, models, options, dtype):
    folder = models[0] if dtype == torch.float32 else models[3]
    adapter = save_adapter(folder, tmp_path / "adapter", **OPTIONS[options])
    reader = AdaptedCheckpointReader(folder, adapter)
    expected = peft_merged(folder, adapter, dtype)
    for key in reader.keys():
        tensor = reader.tensor(key)
        assert tensor.dtype == dtype and torch.equal(tensor, expected[key]), key
    targets = OPTIONS[options].get("target_modules", TARGETS) + OPTIONS[options].get("modules_to_save", [])
    assert {k for k in reader.keys() if reader.copied(k)} == {k for k in reader.keys() if k.split(".")[-2] in targets}


TIED_OPTIONS = {
    "embedding with weight tying": {"target_modules": ["q_proj", "embed_tokens"], "ensure_weight_tying": True},
    "head": {"target_modules": ["q_proj", "lm_head"]},
    "embedding and head": {"target_modules": ["q_proj", "lm_head", "embed_tokens"]},
    "saved head": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("options", sorted(TIED_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tied_embeddings_take_the_heads_update_as_peft_does(tmp_path, options, dtype):
    """A model with tied embeddings stores no LM head: the adapter's head tensors act on the
    embedding (before, they were refused as targeting a tensor the model lacks)."""
    (folder,) = save_variants(tmp_path / "tied", "llama", 1, tied=True, dtype=dtype)
    adapter = save_adapter(folder, tmp_path / "adapter", 5, **TIED_OPTIONS[options])
    reader = AdaptedCheckpointReader(folder, adapter)
    expected = peft_merged(folder, adapter, dtype)
    assert "lm_head.weight" not in reader.keys()
    for key in reader.keys():
        assert torch.equal(reader.tensor(key), expected[key]), key


def _ties(base: str, *models: str) -> dict:
    return {"merge_method": "ties", "base_model": base, "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": 0.6, "density": 0.5}} for m in models]}


def _peft_folder(model: Path, adapter: Path, out: Path) -> Path:
    """The model with the adapter merged by PEFT, saved as a checkpoint folder."""
    peft = require_peer("peft")
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), adapter).merge_and_unload()
    merged.save_pretrained(out)
    return out


def test_merging_adapted_models_equals_merging_peft_merged_folders(tmp_path, models):
    base, first, second = models[:3]
    adapters = [save_adapter(first, tmp_path / "a1", 1), save_adapter(second, tmp_path / "a2", 2, **OPTIONS["rslora and patterns"])]
    merge_checkpoints(_ties(str(base), f"{first}+{adapters[0]}", f"{second}+{adapters[1]}"), tmp_path / "adapted",
                      progress=False)
    merged = [_peft_folder(m, a, tmp_path / f"peft{i}") for i, (m, a) in enumerate(zip((first, second), adapters))]
    merge_checkpoints(_ties(str(base), *map(str, merged)), tmp_path / "reference", progress=False)
    ours, reference = load_file(tmp_path / "adapted" / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert set(ours) == set(reference)
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key


def test_matches_mergekit(tmp_path, models):
    require_peer("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, first, second = models[:3]
    adapter = save_adapter(first, tmp_path / "adapter", 3, **OPTIONS["embedding and saved head"])
    config = _ties(str(base), f"{first}+{adapter}", str(second))
    merge_checkpoints(config, tmp_path / "moefuse", progress=False)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                           lora_merge_cache=str(tmp_path / "cache")))
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "moefuse").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mergekit").state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert_merge_close(ours[key], theirs[key])


def test_adapted_base_and_slices(tmp_path, models):
    """An adapted base is a model of its own: the same folder without the adapter is merged as
    another model, and slices tell the two apart."""
    base, first = models[:2]
    adapter = save_adapter(base, tmp_path / "adapter", 4)
    adapted = f"{base}+{adapter}"
    text = merge_checkpoints(_ties(adapted, str(base), str(first)), tmp_path / "out", dry_run=True)
    assert f"base: {adapted}\nmodel 0: {base}\nmodel 1: {first}\n" in text
    sliced = {"merge_method": "task_arithmetic", "base_model": adapted, "dtype": "float32",
              "slices": [{"sources": [{"model": adapted, "layer_range": [0, 2]},
                                      {"model": str(base), "layer_range": [0, 2], "parameters": {"weight": 1.0}}]}]}
    merge_checkpoints(sliced, tmp_path / "sliced", progress=False)
    out = load_file(tmp_path / "sliced" / "model.safetensors")
    expected = peft_merged(base, adapter, torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for key, tensor in out.items():  # adapted + (plain - adapted) = plain
        assert_merge_close(tensor, plain[key], scale=expected[key].abs())


def _broken_adapter(tmp_path: Path, models, edit) -> Path:
    adapter = save_adapter(models[0], tmp_path / "broken")
    edit(adapter)
    return adapter


def _edit_config(**changes):
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _edit_weights(change):
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_model.safetensors"
        state = load_file(path)
        change(state)
        save_file(state, path)
    return edit


def _pickled_only(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")


def _unknown_module(state: dict) -> None:
    state["base_model.model.model.layers.0.mlp.router.lora_A.weight"] = torch.zeros(4, 64)
    state["base_model.model.model.layers.0.mlp.router.lora_B.weight"] = torch.zeros(8, 4)


def _only_a(state: dict) -> None:
    del state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


def _resized_head(state: dict) -> None:
    state["base_model.model.lm_head.weight"] = torch.zeros(130, 64)


def _wrong_shape(state: dict) -> None:
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 65)


@pytest.mark.parametrize("edit, message", [
    (_edit_config(peft_type="IA3"), "only LoRA adapters can be merged, this one is IA3"),
    (_edit_config(use_dora=True), "uses use_dora, which moefuse does not apply; merge the adapter"),
    (_edit_config(fan_in_fan_out=True, lora_bias=True), "uses lora_bias, fan_in_fan_out"),
    (_pickled_only, "has no adapter_model.safetensors; it holds adapter_model.bin, which moefuse never unpickles"),
    (_edit_weights(_unknown_module), "targets 'model.layers.0.mlp.router.weight', which .* does not have"),
    (_edit_weights(_only_a), "module 'model.layers.0.self_attn.q_proj' has only one of its A and B"),
    (_edit_weights(_wrong_shape), "has A \\[4, 65\\] and B \\[64, 4\\], which do not fit its weight \\[64, 64\\]"),
    (_edit_weights(_resized_head), "'base_model.model.lm_head.weight' has shape \\[130, 64\\] where the model's "
                                   "'lm_head.weight' has \\[128, 64\\] \\(an adapter trained with a resized vocabulary"),
])
def test_bad_adapters_are_refused(tmp_path, models, edit, message):
    adapter = _broken_adapter(tmp_path, models, edit)
    for dry_run in (True, False):
        with pytest.raises(CheckpointError, match=message):
            merge_checkpoints(_ties(str(models[0]), f"{models[1]}+{adapter}"), tmp_path / "out", progress=False,
                              dry_run=dry_run)
    assert not (tmp_path / "out").exists()


def test_missing_adapter_folders_and_references_are_named(tmp_path, models):
    with pytest.raises(CheckpointError, match=f"LoRA adapter folder {tmp_path / 'nope'} does not exist"):
        merge_checkpoints(_ties(str(models[0]), f"{models[1]}+{tmp_path / 'nope'}"), tmp_path / "out", progress=False)
    with pytest.raises(MergeConfigError, match="names no adapter after '\\+'"):
        merge_checkpoints(_ties(str(models[0]), f"{models[1]}+"), tmp_path / "out", progress=False)
    with pytest.raises(MergeConfigError, match="looks like a MODEL\\+ADAPTER reference, which is taken for models only"):
        merge_checkpoints({**_ties(str(models[0]), str(models[1])), "tokenizer_source": f"{models[1]}+x"},
                          tmp_path / "out", progress=False)


def test_output_may_not_replace_an_adapter(tmp_path, models):
    adapter = save_adapter(models[1], tmp_path / "adapter")
    with pytest.raises(OutputIsInputError, match=f"output folder {adapter} is the input"):
        merge_checkpoints(_ties(str(models[0]), f"{models[1]}+{adapter}"), adapter, progress=False, overwrite=True)
    assert (adapter / "adapter_model.safetensors").exists()



def test_plus_signs_in_folder_names(tmp_path, models):
    """MODEL+ADAPTER splits where a model folder ends: an empty folder named like the text before
    the first '+' does not count."""
    model = shutil.copytree(models[1], tmp_path / "m+x")
    (tmp_path / "m").mkdir()
    adapter = save_adapter(models[1], tmp_path / "a+b")
    text = merge_checkpoints(_ties(str(models[0]), f"{model}+{adapter}"), tmp_path / "out", dry_run=True)
    assert f"model 0: {model}+{adapter}\n" in text
