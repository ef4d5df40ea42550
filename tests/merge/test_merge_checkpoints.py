"""`moefuse merge` on tiny checkpoints: parity with mergekit, loading with transformers, the
written layout, the CLI and dry runs."""

from __future__ import annotations

import json
import subprocess
import sys
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moefuse
from moefuse.cli import main as cli_main
from moefuse.merge import merge_checkpoints
from tests.checkpoints import save_variants
from tests.helpers import assert_merge_close, require_peer

DETERMINISTIC = {
    "task_arithmetic": {"models": {"weight": [0.7, 0.4]}, "parameters": {"lambda": 0.9}},
    "ties": {"models": {"weight": [1.0, 0.5], "density": [0.4, 0.6]}, "parameters": {"normalize": True}},
    "breadcrumbs": {"models": {"weight": [1.0, 0.5], "density": 0.6, "gamma": 0.1}, "parameters": {}},
    "breadcrumbs_ties": {"models": {"weight": [1.0, 0.5], "density": 0.7, "gamma": 0.05}, "parameters": {}},
    "linear": {"models": {"weight": [0.2, 0.3, 0.5]}, "parameters": {}},
    "slerp": {"models": {}, "parameters": {"t": [0.0, 0.5, 1.0]}},
    "model_stock": {"models": {}, "parameters": {}},
    "nuslerp": {"models": {"weight": [0.3, 0.7]}, "parameters": {}},
    "multislerp": {"models": {"weight": [0.5, 0.8]}, "parameters": {}},
    "karcher": {"models": {}, "parameters": {"max_iter": 20}},  # mergekit adds the base as a third input
    "nearswap": {"models": {}, "parameters": {"t": 0.01}},
    "sce": {"models": {}, "parameters": {"select_topk": 0.5}},
}


def _config(folders, method, dtype="float32"):
    base, *others = folders
    case = DETERMINISTIC[method]
    listed = {"linear": folders, "slerp": [base, others[0]], "nearswap": others[:1]}.get(method, others)
    models = []
    for i, folder in enumerate(listed):
        parameters = {k: (v[i] if isinstance(v, list) else v) for k, v in case["models"].items()}
        models.append({"model": str(folder), **({"parameters": parameters} if parameters else {})})
    config = {"merge_method": method, "models": models, "dtype": dtype, "parameters": dict(case["parameters"])}
    if method != "linear":
        config["base_model"] = str(base)
    return config


def _run_mergekit(config: dict, out: Path) -> None:
    require_peer("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))


def _state(folder: Path) -> dict:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_matches_mergekit(config: dict, tmp_path: Path, state=_state) -> None:
    """`moefuse merge` and mergekit's run of `config` give the same tensors (`state` reads them)."""
    merge_checkpoints(config, tmp_path / "moefuse", progress=False)
    _run_mergekit(config, tmp_path / "mergekit")
    ours, theirs = state(tmp_path / "moefuse"), state(tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for key in ours:
        assert_merge_close(ours[key], theirs[key])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """fp32 base + 2 variants per architecture (sharded; llama-tied ties its LM head)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: save_variants(root / name, architecture, 3, tied=tied)
        for name, architecture, tied in [
            ("llama", "llama", False), ("llama-tied", "llama", True), ("mistral", "mistral", False), ("qwen2", "qwen2", False)
        ]
    }


@pytest.fixture(scope="module")
def llama_models(checkpoints):
    return checkpoints["llama"]


@pytest.mark.parametrize("architecture", ["llama", "llama-tied", "mistral", "qwen2"])
@pytest.mark.parametrize("method", sorted(DETERMINISTIC))
def test_matches_mergekit(tmp_path, checkpoints, architecture, method):
    assert_matches_mergekit(_config(checkpoints[architecture], method), tmp_path)


@pytest.mark.parametrize("parameters", [{"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
                         ids=["rows", "columns"])
def test_nuslerp_per_vector_matches_mergekit(tmp_path, llama_models, parameters):
    config = _config(llama_models, "nuslerp")
    config["parameters"].update(parameters)
    assert_matches_mergekit(config, tmp_path)


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_optional_base_left_out_matches_mergekit(tmp_path, llama_models, method):
    """Without a base_model the spherical methods interpolate the models themselves."""
    config = _config(llama_models, method)
    del config["base_model"]
    assert_matches_mergekit(config, tmp_path)


def test_karcher_with_the_base_listed_takes_it_once(tmp_path, llama_models):
    config = _config(llama_models, "karcher")
    config["models"].insert(0, {"model": config["base_model"]})
    assert_matches_mergekit(config, tmp_path)


def test_bf16_checkpoints_with_out_dtype(tmp_path):
    folders = save_variants(tmp_path / "in", "llama", 3, tied=True, dtype=torch.bfloat16)
    config = {**_config(folders, "task_arithmetic"), "out_dtype": "bfloat16"}
    merge_checkpoints(config, tmp_path / "moefuse", progress=False)
    _run_mergekit(config, tmp_path / "mergekit")
    ours, theirs = _state(tmp_path / "moefuse"), _state(tmp_path / "mergekit")
    for key in ours:
        assert ours[key].dtype == torch.bfloat16
        assert_merge_close(ours[key], theirs[key], ulps=1)
    assert json.loads((tmp_path / "moefuse" / "config.json").read_text())["dtype"] == "bfloat16"


def test_filters_and_gradients_follow_mergekit(tmp_path, llama_models):
    config = _config(llama_models, "ties")
    config["models"][0]["parameters"]["density"] = [{"filter": "self_attn", "value": 0.3}, {"value": [0.2, 0.9]}]
    config["parameters"]["weight"] = 0.8
    assert_matches_mergekit(config, tmp_path)


@pytest.fixture
def small_row_blocks(monkeypatch):
    """Row blocks of at most 256 entries, so that every matrix spans several."""
    from moefuse.ops import rowwise

    monkeypatch.setattr(rowwise, "ROW_BLOCK_ENTRIES", 256)
    monkeypatch.setattr(rowwise, "FUSED_BLOCK_ENTRIES", 256)


def test_filter_wise_model_stock_matches_mergekit(tmp_path, llama_models, small_row_blocks):
    """Streamed in blocks of whole filters (`moefuse.ops.rowwise`)."""
    config = _config(llama_models, "model_stock")
    config["parameters"]["filter_wise"] = True
    assert_matches_mergekit(config, tmp_path)


def test_della_checkpoint_equals_the_reference_per_tensor(tmp_path, llama_models, small_row_blocks):
    """DELLA's masks are moefuse's own draws (not mergekit's), so the streamed checkpoint merge is
    checked against the whole-tensor reference, tensor by tensor."""
    base, *others = llama_models
    parameters = {"density": 0.6, "epsilon": 0.2, "weight": 0.5}
    config = {"merge_method": "della", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(m), "parameters": parameters} for m in others], "parameters": {"seed": 3}}
    merge_checkpoints(config, tmp_path / "out", progress=False)
    merged = {}
    for name in sorted((tmp_path / "out").glob("*.safetensors")):
        merged.update(load_file(name))
    inputs = [{}, {}, {}]
    for state, folder in zip(inputs, llama_models):
        for name in sorted(folder.glob("*.safetensors")):
            state.update(load_file(name))
    for key, tensor in merged.items():
        expected = moefuse.merge_tensors(inputs[0][key], [inputs[1][key], inputs[2][key]], "della",
                                         backend="reference", seed=3, **parameters)
        assert_merge_close(tensor, expected)


def test_identical_models_reproduce_the_base(tmp_path, llama_models):
    base = llama_models[0]
    copies = [shutil.copytree(base, tmp_path / f"copy-{i}") for i in range(2)]
    config = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(c)} for c in copies],
              "parameters": {"density": 0.5, "weight": 0.5}}
    merge_checkpoints(config, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_output_layout_sharding_and_generation(tmp_path, llama_models):
    merge_checkpoints(_config(llama_models, "ties"), tmp_path / "out", progress=False, max_shard_size="50KB")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(name in files for name in shards)
    assert "config.json" in files and "generation_config.json" in files
    for shard in shards:
        load_file(tmp_path / "out" / shard)  # valid safetensors
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 8)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folders left behind"


def test_direct_and_buffered_output_are_the_same_bytes(tmp_path, llama_models):
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump(_config(llama_models, "ties")))
    assert cli_main(["merge", str(config_path), str(tmp_path / "direct"), "--quiet", "--max-shard-size", "50KB"]) == 0
    assert cli_main(["merge", str(config_path), str(tmp_path / "buffered"), "--quiet", "--max-shard-size", "50KB",
                     "--buffered-output"]) == 0
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "buffered").iterdir()) and len(names) > 3
    for name in names:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes(), name


def test_cli_merge_dry_run_and_quiet(tmp_path, llama_models, capsys):
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump(_config(llama_models, "ties")))
    assert cli_main(["merge", str(config_path), str(tmp_path / "plan"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "method: ties" in plan and "tensors: 21" in plan and "expected peak memory" in plan
    assert not (tmp_path / "plan").exists()
    assert cli_main(["merge", str(config_path), str(tmp_path / "out"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "out" / "model.safetensors").exists() or (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_a_merge_does_not_import_transformers(tmp_path, llama_models):
    """Start-up counts in a merge's wall time: only merges that align vocabularies import transformers."""
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(_config(llama_models, "ties")))
    code = ("import sys\nfrom moefuse.cli import main\n"
            "assert main(['merge', sys.argv[1], sys.argv[2], '--quiet']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')))\n")
    result = subprocess.run([sys.executable, "-c", code, str(config), str(tmp_path / "out")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "out" / "config.json").exists()
