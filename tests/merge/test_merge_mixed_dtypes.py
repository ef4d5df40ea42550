"""Inputs stored in differing floating dtypes (an fp32 base, bf16 fine-tunes): cast to the config's
`dtype`, else to their promoted type, as mergekit does; other dtype mismatches are still refused.

The base is a noisy fp32 checkpoint, not bf16-representable, so that fp32 task vectors have no
magnitude ties (where moefuse's documented tie rule and mergekit's top-k may keep different entries).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moefuse
from moefuse import MergeInputError
from moefuse.merge import merge_checkpoints
from moefuse.ops.merge import merge_streamed
from tests.checkpoints import save_variants
from tests.helpers import assert_merge_close
from tests.merge.test_merge_checkpoints import _config, _run_mergekit, assert_matches_mergekit
from tests.merge.test_merge_slices import _tensors
from tests.ops.test_merge_backends import _device_for


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A noisy fp32 llama base and two bf16 fine-tunes (single-file checkpoints)."""
    root = tmp_path_factory.mktemp("mixed")
    full = save_variants(root / "fp32", "llama", 4, shard_size="1GB")
    half = save_variants(root / "bf16", "llama", 4, dtype=torch.bfloat16, shard_size="1GB")
    return [full[1], *half[2:]]


def _cast_copy(folder: Path, dest: Path, dtype: torch.dtype) -> Path:
    """A copy of the single-file checkpoint `folder` at `dest`, its floating tensors cast to `dtype`."""
    dest.mkdir()
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "config.json").write_bytes((folder / "config.json").read_bytes())
    return dest


def _output_dtype(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["dtype"]


def _assert_same(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in actual:
        assert actual[key].dtype == expected[key].dtype and torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_config_dtype_casts_every_input_as_mergekit_does(tmp_path, mixed, method):
    """With `dtype: bfloat16` the fp32 base is cast to bf16: exactly the merge of a bf16 copy of
    it. mergekit then computes in bf16 too, where moefuse keeps fp32 (and breaks the frequent
    16-bit magnitude ties its own way), so not to 1 ulp: close almost everywhere in the model, as
    in the half-precision tests of tests/integrations/test_mergekit_backend.py."""
    config = _config(mixed, method, dtype="bfloat16")
    merge_checkpoints(config, tmp_path / "moefuse", progress=False)
    ours = _tensors(tmp_path / "moefuse")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert _output_dtype(tmp_path / "moefuse") == "bfloat16"

    cast_base = _cast_copy(mixed[0], tmp_path / "bf16-base", torch.bfloat16)
    merge_checkpoints({**config, "base_model": str(cast_base)}, tmp_path / "cast", progress=False)
    _assert_same(ours, _tensors(tmp_path / "cast"))

    _run_mergekit(config, tmp_path / "mergekit")
    theirs = _tensors(tmp_path / "mergekit")
    assert set(ours) == set(theirs) and {t.dtype for t in theirs.values()} == {torch.bfloat16}
    close = torch.cat([torch.isclose(ours[k].float(), theirs[k].float(), rtol=0.02, atol=0.02).reshape(-1)
                       for k in ours])
    assert close.float().mean() > 0.99


def _without_dtype(config: dict) -> dict:
    return {key: value for key, value in config.items() if key != "dtype"}


def _ties(folders, dtype=None) -> dict:
    """A ties config of `folders` (base first), with `dtype` if given."""
    return {**_without_dtype(_config(folders, "ties")), **({"dtype": dtype} if dtype else {})}


def _sliced(config: dict, layers: int = 2) -> dict:
    """`config` (base and models) as one slice of all the layers."""
    sources = [{"model": config["base_model"], "layer_range": [0, layers]}]
    sources += [{"model": m["model"], "layer_range": [0, layers], **({"parameters": m["parameters"]}
                                                                       if "parameters" in m else {})}
                for m in config["models"]]
    return {**{k: v for k, v in config.items() if k != "models"}, "slices": [{"sources": sources}]}


@pytest.mark.parametrize("form", ["models", "slices"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_mixed_inputs_without_dtype_merge_in_the_promoted_type(tmp_path, mixed, method, form):
    config = _without_dtype(_config(mixed, method))
    config = config if form == "models" else _sliced(config)
    assert_matches_mergekit(config, tmp_path, state=_tensors)
    assert {t.dtype for t in _tensors(tmp_path / "moefuse").values()} == {torch.float32}
    assert _output_dtype(tmp_path / "moefuse") == "float32"


def test_mixed_inputs_equal_the_merge_of_the_fp32_inputs(tmp_path, mixed):
    """Without `dtype`, the bf16 models are widened to fp32 before merging: the same numbers as
    the merge of fp32 copies of them."""
    config = _ties(mixed)
    merge_checkpoints(config, tmp_path / "mixed", progress=False)
    for i, entry in enumerate(config["models"]):
        entry["model"] = str(_cast_copy(Path(entry["model"]), tmp_path / f"fp32-{i}", torch.float32))
    merge_checkpoints(config, tmp_path / "fp32", progress=False)
    _assert_same(_tensors(tmp_path / "mixed"), _tensors(tmp_path / "fp32"))


def _add_tensor(folder: Path, key: str, tensor: torch.Tensor) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    state[key] = tensor
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("form", ["models", "slices"])
def test_int_tensors_of_differing_dtypes_are_refused(tmp_path, mixed, form):
    folders = [Path(shutil.copytree(source, tmp_path / f"in{i}")) for i, source in enumerate(mixed)]
    key = "model.position_ids"
    for folder, dtype in zip(folders, [torch.int32, torch.int64, torch.int32]):
        _add_tensor(folder, key, torch.arange(8, dtype=dtype))
    config = _ties(folders, "bfloat16")
    config = config if form == "models" else _sliced(config)
    message = f"tensor '{key}': {folders[1]} has shape \\[8\\] torch.int64 .*, but {folders[0]} has \\[8\\] torch.int32"
    with pytest.raises(MergeInputError, match=message):
        merge_checkpoints(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_shapes_must_still_match(tmp_path, mixed):
    key = "model.layers.1.mlp.up_proj.weight"
    short = _cast_copy(mixed[2], tmp_path / "short", torch.bfloat16)
    _add_tensor(short, key, load_file(short / "model.safetensors")[key][:-1].contiguous())
    config = _ties([mixed[0], mixed[1], short])
    with pytest.raises(MergeInputError, match=f"tensor '{key}': {short} has shape \\[95, 64\\] torch.bfloat16 .*"
                                              f"but {mixed[0]} has \\[96, 64\\] torch.float32"):
        merge_checkpoints(config, tmp_path / "out", progress=False)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_dry_run_plans_mixed_inputs(tmp_path, mixed, dtype):
    config = _ties(mixed, dtype)
    described = merge_checkpoints(config, tmp_path / "out", dry_run=True)
    assert "method: ties" in described and "expected peak memory" in described
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("method", ["ties", "della", "linear", "model_stock"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_merge_casts_mixed_inputs_for_every_backend(backend, method, compute_dtype):
    """`merge_streamed` with a compute dtype takes inputs of differing dtypes: the numbers of the
    merge of the inputs cast beforehand. Without one they are refused, as by `merge_tensors`."""
    device = "cpu" if backend == "reference" else _device_for(backend)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(24, 40, generator=generator)
    tensors = [(base + 0.05 * torch.randn(24, 40, generator=generator)).to(dtype)
               for dtype in (torch.bfloat16, torch.float16)]
    params = {"ties": {"density": 0.5}, "della": {"density": 0.5, "epsilon": 0.1, "seed": 1}}.get(method, {})
    if method == "linear":
        base, tensors, params = None, [base, *tensors], {"weight": [0.2, 0.3, 0.5]}
    base = base.to(device) if base is not None else None
    tensors = [t.to(device) for t in tensors]
    pieces = []
    merge_streamed(base, tensors, method, pieces.append, piece_size=1 << 16, compute_dtype=compute_dtype,
                   backend=backend, **params)
    expected = moefuse.merge_tensors(base.to(compute_dtype) if base is not None else None,
                                     [t.to(compute_dtype) for t in tensors], method, backend=backend, **params)
    merged = torch.cat([p.reshape(-1) for p in pieces]).reshape(expected.shape)
    assert merged.dtype == compute_dtype
    assert torch.equal(merged, expected)
    with pytest.raises(MergeInputError, match="has dtype torch.bfloat16 but .* has torch.float32"):
        merge_streamed(base, tensors, method, pieces.append, piece_size=1 << 16, backend=backend, **params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_cuda_merge_of_mixed_inputs_equals_the_cpu_merge(tmp_path, mixed, dtype):
    """The GPU loader casts each task's inputs to its compute dtype as the CPU pieces are."""
    config = _ties(mixed, dtype)
    merge_checkpoints(config, tmp_path / "cpu", progress=False, device="cpu")
    merge_checkpoints(config, tmp_path / "cuda", progress=False, device="cuda")
    cpu, cuda = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "cuda")
    assert set(cpu) == set(cuda)
    for key in cpu:
        assert_merge_close(cuda[key], cpu[key])
