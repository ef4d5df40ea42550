"""The catalogue of bad inputs for `moefuse merge`: each gets a clear error naming the file,
tensor, shape or option, and nothing that looks like a finished output is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moefuse import MergeConfigError, MergeInputError, MoefuseError
from moefuse.cli import main as cli_main
from moefuse.io.output import OutputExistsError, OutputIsInputError
from moefuse.io.safetensors_reader import CheckpointError
from moefuse.merge import merge_checkpoints
from moefuse.merge import run as merge_run
from tests.checkpoints import save_variants
from tests.moe.tiny_models import word_tokenizer


@pytest.fixture
def models(tmp_path):
    return save_variants(tmp_path / "in", "llama", 3, shard_size="1GB")


def _ties(models, **extra):
    return {"merge_method": "ties", "base_model": str(models[0]),
            "models": [{"model": str(m), "parameters": {"density": 0.5}} for m in models[1:]], **extra}


def _rewrite(folder: Path, edit) -> None:
    """Load the single-file checkpoint in `folder`, apply `edit(state)`, save it back."""
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _leftovers(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.name == "out")


def test_missing_model_folder(tmp_path, models):
    config = _ties(models)
    config["models"][0]["model"] = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=f"model folder {tmp_path / 'nowhere'} does not exist"):
        merge_checkpoints(config, tmp_path / "out", progress=False)


def test_truncated_safetensors(tmp_path, models):
    path = models[1] / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path} is truncated: tensor '.*' ends at byte"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)


def test_corrupt_safetensors_header(tmp_path, models):
    path = models[2] / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"{not json!!!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path} has a corrupt safetensors header"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)


def test_pickled_checkpoint_is_refused(tmp_path, models):
    (models[1] / "model.safetensors").unlink()
    (models[1] / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickled PyTorch weights \\(pytorch_model.bin\\); moefuse never unpickles"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)


def test_shape_mismatch_names_the_tensor(tmp_path, models):
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite(models[2], lambda s: s.__setitem__(key, s[key][:-1].contiguous()))
    with pytest.raises(MergeInputError, match=f"tensor '{key}': .*has shape \\[95, 64\\].*has \\[96, 64\\]"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)


def test_dtype_mismatch_names_the_tensor(tmp_path, models):
    """Floating dtypes may differ (the merge casts them, see test_merge_mixed_dtypes.py); a
    floating tensor against an integer one may not."""
    key = "model.norm.weight"
    _rewrite(models[1], lambda s: s.__setitem__(key, s[key].to(torch.int32)))
    with pytest.raises(MergeInputError, match=f"tensor '{key}': .*torch.int32.*torch.float32"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)


def test_missing_tensor(tmp_path, models):
    key = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(models[1], lambda s: s.pop(key))
    with pytest.raises(MergeInputError, match=f"tensor '{key}' is missing from {models[1]}"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)


def test_unknown_method_and_parameter(tmp_path, models):
    with pytest.raises(MergeConfigError, match="unknown merge method 'tiez'; valid methods: .*ties"):
        merge_checkpoints({**_ties(models), "merge_method": "tiez"}, tmp_path / "out", progress=False)
    config = _ties(models)
    config["models"][0]["parameters"]["densty"] = 0.5
    with pytest.raises(MergeConfigError, match="no parameter 'densty'; valid parameters: .*density"):
        merge_checkpoints(config, tmp_path / "out", progress=False)
    with pytest.raises(MergeConfigError, match="'normalize' must be true or false"):
        merge_checkpoints(_ties(models, parameters={"normalize": "maybe"}), tmp_path / "out", progress=False)
    config["models"][0]["parameters"] = {"density": 2}
    with pytest.raises(MergeConfigError, match="model 0: 'density' must be <= 1.0"):
        merge_checkpoints(config, tmp_path / "out", progress=False)


def test_new_methods_name_their_options(tmp_path, models):
    """A global parameter set per model, a model count the method cannot take, a missing weight."""
    base, first, second = (str(m) for m in models)
    config = {"merge_method": "nearswap", "base_model": base, "models": [{"model": first, "parameters": {"t": 0.1}}]}
    with pytest.raises(MergeConfigError, match="parameter 't' of merge_method 'nearswap' is global: set it, for "
                                               "every tensor, in the top-level parameters"):
        merge_checkpoints(config, tmp_path / "out", progress=False)
    config = {"merge_method": "nuslerp", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, first,
                                                                                                       second)]}
    with pytest.raises(MergeConfigError, match="merge_method 'nuslerp' needs exactly 2 model\\(s\\), got 3"):
        merge_checkpoints(config, tmp_path / "out", progress=False)
    config = {"merge_method": "multislerp", "base_model": base, "models": [{"model": first}, {"model": second}]}
    with pytest.raises(MergeConfigError, match="parameter 'weight' is required"):
        merge_checkpoints(config, tmp_path / "out", progress=False)
    assert _leftovers(tmp_path) == []
    config = _ties(models)  # lambda has a default: mergekit ignores it under a model, moefuse warns
    config["models"][0]["parameters"]["lambda"] = 0.5
    with pytest.warns(UserWarning, match="'lambda' of merge_method 'ties' is global; the value set under a model is "
                                         "ignored"):
        merge_checkpoints(config, tmp_path / "out", progress=False, dry_run=True)


def test_bad_yaml_and_unsupported_keys(tmp_path, models):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: ties\nmodels: [unclosed\n")
    with pytest.raises(MergeConfigError, match=f"config file {bad} is not valid YAML"):
        merge_checkpoints(bad, tmp_path / "out", progress=False)
    bad.write_bytes("merge_method: ties  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(MergeConfigError, match=f"config file {bad} is not UTF-8 text .* at byte 25\\); save it as UTF-8"):
        merge_checkpoints(bad, tmp_path / "out", progress=False)
    for modules in ({"text_decoder": {}}, {}):
        with pytest.raises(MergeConfigError, match="'modules': multi-module configurations are not supported"):
            merge_checkpoints({**_ties(models), "modules": modules}, tmp_path / "out", progress=False)
    for template in ("", "chatm", 3):
        with pytest.raises(MergeConfigError, match="chat_template .* is neither 'auto', a built-in template "
                                                   "\\(chatml, llama3, mistral, alpaca, exaone\\) nor a Jinja template"):
            merge_checkpoints({**_ties(models), "chat_template": template}, tmp_path / "out", progress=False)
    with pytest.raises(MergeConfigError, match="unknown key\\(s\\) merge_mthod"):
        merge_checkpoints({"merge_mthod": "ties"}, tmp_path / "out", progress=False)


def test_existing_output_is_refused_unless_overwrite(tmp_path, models):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists; choose another or pass --overwrite"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)
    merge_checkpoints(_ties(models), tmp_path / "out", progress=False, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert _leftovers(tmp_path) == ["out"]


def test_failure_midway_leaves_nothing_that_looks_complete(tmp_path, models, monkeypatch):
    calls = {"n": 0}
    real = merge_run.merge_streamed

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise MoefuseError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_run, "merge_streamed", failing)
    with pytest.raises(MoefuseError, match="disk on fire"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)
    assert _leftovers(tmp_path) == []


def _start_slow_merge(tmp_path, models, command: str) -> subprocess.Popen:
    """A subprocess running `command` (Python, with `config` and `out` defined) on a TIES merge
    that sleeps before each tensor; returns once a few tensors are in."""
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump(_ties(models)))
    script = (
        "import time, sys\n"
        "from moefuse.merge import run\n"
        "real = run.merge_streamed\n"
        "def slow(*a, **k):\n"
        "    print('tensor', flush=True); time.sleep(0.2); return real(*a, **k)\n"
        "run.merge_streamed = slow\n"
        f"config, out = {str(config_path)!r}, {str(tmp_path / 'out')!r}\n"
        f"{command}\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=Path(__file__).resolve().parents[2])
    for _ in range(4):
        assert process.stdout.readline().startswith("tensor")
    return process


def test_process_killed_midway_leaves_nothing_that_looks_complete(tmp_path, models):
    process = _start_slow_merge(tmp_path, models, "run.merge_checkpoints(config, out, progress=False)")
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (tmp_path / "out").exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.moefuse-partial-")]
    assert len(partial) == 1, "the killed run's work stays in a hidden partial folder"
    shutil.rmtree(partial[0])


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGINT, 130, "interrupted")])
def test_cli_stopped_midway_removes_its_partial_folder(tmp_path, models, signum, status, word):
    """SIGTERM (a job scheduler, `kill`) and Ctrl-C end the command with no traceback, no output
    folder and no partial folder left."""
    process = _start_slow_merge(tmp_path, models,
                                "from moefuse.cli import main; sys.exit(main(['merge', config, out, '--quiet']))")
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert err.strip() == f"moefuse: {word}; no output was written"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("output", ["the base", "a model", "the folder of the inputs", "the tokenizer source"])
def test_output_folder_that_is_or_holds_an_input_is_refused(tmp_path, models, output):
    config = _ties(models)
    out = {"the base": models[0], "a model": models[2], "the folder of the inputs": models[0].parent,
           "the tokenizer source": tmp_path / "tok"}[output]
    if output == "the tokenizer source":
        for folder in models:
            word_tokenizer().save_pretrained(folder)
        shutil.copytree(models[0], out)
        config["tokenizer_source"] = str(out)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(OutputIsInputError, match=f"output folder {out} (is|holds) the input .*Choose another"):
        merge_checkpoints(config, out, progress=False, overwrite=True)
    assert sorted(p.name for p in out.rglob("*")) == before
    text = merge_checkpoints(config, out, dry_run=True, overwrite=True)
    assert f"output: refused: output folder {out}" in text


def test_dry_run_says_what_it_would_do_with_the_output_folder(tmp_path, models):
    assert merge_checkpoints(_ties(models), tmp_path / "out", dry_run=True).endswith(f"output: {tmp_path / 'out'} (new)")
    (tmp_path / "out").mkdir()
    assert "exists and would be refused (pass --overwrite)" in merge_checkpoints(_ties(models), tmp_path / "out",
                                                                               dry_run=True)
    assert "exists and would be replaced" in merge_checkpoints(_ties(models), tmp_path / "out", dry_run=True,
                                                               overwrite=True)


def test_output_permissions_follow_the_umask(tmp_path, models):
    previous = os.umask(0o027)
    try:
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o640}


@pytest.mark.parametrize("device, message", [
    ("foo", "--device 'foo' is not a device name; use cpu, cuda or cuda:N"),
    ("meta", "--device meta: moefuse runs on cpu or cuda, not meta"),
    pytest.param("cuda", "--device cuda was asked for but this machine has no usable CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_device_is_refused_before_anything_is_written(tmp_path, models, capsys, device, message):
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump(_ties(models)))
    assert cli_main(["merge", str(config_path), str(tmp_path / "out"), "--device", device, "--quiet"]) == 2
    assert f"moefuse: error: {message}" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_cli_reports_errors_with_exit_code_2(tmp_path, models, capsys):
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump({**_ties(models), "merge_method": "nope"}))
    assert cli_main(["merge", str(config_path), str(tmp_path / "out")]) == 2
    assert "moefuse: error: unknown merge method 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("poisoned, value", [(0, "inf"), (2, "nan")], ids=["inf in the base", "nan in a model"])
def test_nonfinite_inputs_name_the_model_folder_unless_allowed(tmp_path, models, capsys, poisoned, value):
    key = "model.layers.1.mlp.up_proj.weight"

    def poison(state):
        state[key][0, 0] = float(value)

    _rewrite(models[poisoned], poison)
    with pytest.raises(MergeInputError, match=f"tensor '{key}' of {models[poisoned]} holds 1 NaN/Inf value"):
        merge_checkpoints(_ties(models), tmp_path / "out", progress=False)
    assert _leftovers(tmp_path) == []
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump(_ties(models)))
    assert cli_main(["merge", str(config_path), str(tmp_path / "out"), "--quiet"]) == 2
    assert "or pass --allow-nonfinite (allow_nonfinite=True)" in capsys.readouterr().err
    assert cli_main(["merge", str(config_path), str(tmp_path / "out"), "--quiet", "--allow-nonfinite"]) == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")[key]
    assert not torch.isfinite(merged[0, 0]) and torch.isfinite(merged.flatten()[1:]).all()
