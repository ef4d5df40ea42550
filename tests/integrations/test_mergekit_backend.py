"""moefuse as mergekit's backend (`moefuse.integrations.mergekit`), against mergekit's own code.

Each check runs the same mergekit call twice, with and without the backend enabled, and uses a
spy on `merge_tensors` to make sure the enabled run really went through moefuse. fp32 results
must agree to 1e-6 relative. DARE/DELLA masks are moefuse's own, so those methods are compared
at density 1 and their keep rate is checked at density 0.5.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List
from unittest import mock

import pytest
import torch
import yaml

from moefuse.errors import MergeConfigError
from moefuse.integrations import mergekit as backend
from tests.helpers import assert_close_fp32, require_peer

require_peer("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.merge_methods import PerGroupValues, TensorBatch, TensorGroup, registry  # noqa: E402
from mergekit.merge_methods import merge_tensors as mergekit_merge_tensors  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

COVERED = (
    "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear", "karcher",
    "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "sce", "slerp", "task_arithmetic", "ties",
)

# case ("method" or "method-variant") -> mergekit parameters; per-model values in input order,
# for the models after the base (linear has no base)
CASES: Dict[str, dict] = {
    "task_arithmetic": {"weight": [1.0, 0.5, -0.3], "lambda": 0.8},
    "ties": {"weight": [1.0, 0.6, 0.8], "density": [0.3, 0.5, 0.7]},
    "ties-rescale": {"weight": [0.4, 0.6, 0.8], "density": 0.4, "normalize": False, "rescale": True},
    "ties-int8": {"weight": [1.0, 0.6, 0.8], "density": 0.5, "int8_mask": True},
    "breadcrumbs": {"weight": [1.0, 0.5, 0.7], "density": 0.6, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": [1.0, 0.5, 0.7], "density": 0.6, "gamma": 0.1},
    "dare_ties": {"weight": [1.0, 0.5, 0.7], "density": 1.0},
    "dare_linear": {"weight": [0.3, 0.3, 0.4], "density": 1.0},
    "della": {"weight": [1.0, 0.5, 0.7], "density": 1.0, "epsilon": 0.1},
    "della_linear": {"weight": [1.0, 0.5, 0.7], "density": 1.0, "epsilon": 0.1},
    "linear": {"weight": [1.0, 0.5, 2.0]},
    "linear-sum": {"weight": [1.0, -0.5, 2.0], "normalize": False},
    "slerp": {"t": 0.3},
    "model_stock": {},
    "model_stock-filter_wise": {"filter_wise": True},
    "nuslerp": {"weight": [0.3, 0.8]},
    "nuslerp-rows": {"weight": [0.3, 0.8], "nuslerp_flatten": False},
    "multislerp": {"weight": [0.2, 0.5, 0.9]},
    "karcher": {"max_iter": 20},
    "nearswap": {"t": 0.02},
    "sce": {"select_topk": 0.5},
}


@pytest.fixture(autouse=True)
def _disabled_afterwards():
    yield
    backend.disable()


@contextmanager
def spy() -> Iterator[mock.MagicMock]:
    """Count the integration's calls to moefuse.merge_tensors (still running it)."""
    with mock.patch.object(backend, "merge_tensors", wraps=backend.merge_tensors) as calls:
        yield calls


def _inputs(count: int, shape=(64, 48), seed=0) -> List[torch.Tensor]:
    """A base and count - 1 models near it."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return [base] + [base + 0.05 * torch.randn(shape, generator=generator) for _ in range(count - 1)]


def _call(case: str, tensors: List[torch.Tensor]) -> torch.Tensor:
    """mergekit's public entry point for one output tensor (binding, dtype handling, kernel)."""
    method = case.split("-")[0]
    return mergekit_merge_tensors(
        tensors, method, parameters=CASES[case], base_index=None if method in ("linear", "karcher") else 0
    )


def _count(case: str) -> int:
    """How many input tensors a case takes (the base included)."""
    return {"slerp": 2, "nearswap": 2, "linear": 3, "nuslerp": 3}.get(case.split("-")[0], 4)


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_mergekit(case):
    tensors = _inputs(_count(case))
    expected = _call(case, tensors)
    with backend.enabled(), spy() as calls:
        actual = _call(case, tensors)
    assert calls.call_count == 1
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert_close_fp32(actual, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["ties", "linear", "slerp", "model_stock"])
def test_half_precision_keeps_mergekits_dtype(case, dtype):
    tensors = [t.to(dtype) for t in _inputs(_count(case))]
    expected = _call(case, tensors)
    with backend.enabled(), spy() as calls:
        actual = _call(case, tensors)
    assert calls.call_count == 1
    assert actual.dtype == expected.dtype == dtype
    # mergekit rounds intermediate steps to 16 bits where moefuse keeps fp32, and breaks the
    # frequent 16-bit magnitude ties at the trim threshold differently: close almost everywhere
    close = torch.isclose(actual.float(), expected.float(), rtol=0.02, atol=0.02)
    assert close.float().mean() > 0.99


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_keep_half_and_preserve_the_l1_norm(method):
    base = torch.zeros(256, 256)
    model = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    params = {"weight": 1.0, "density": 0.5, **({"epsilon": 0.1} if method == "della_linear" else {})}
    with backend.enabled(), spy() as calls:
        merged = mergekit_merge_tensors([base, model], method, parameters=params, base_index=0)
    assert calls.call_count == 1
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    # rescale (the default): the kept entries, all scaled by one factor, have the task vector's L1 norm
    scale = merged[kept] / model[kept]
    assert_close_fp32(scale, scale.mean().expand_as(scale))
    assert abs(merged.abs().sum().item() / model.abs().sum().item() - 1) < 1e-5


def test_random_methods_follow_torchs_seed():
    tensors = _inputs(3)
    params = {"weight": [0.5, 0.5], "density": 0.5}
    with backend.enabled():
        torch.manual_seed(7)
        first = mergekit_merge_tensors(tensors, "dare_ties", parameters=params, base_index=0)
        second = mergekit_merge_tensors(tensors, "dare_ties", parameters=params, base_index=0)
        torch.manual_seed(7)
        again = mergekit_merge_tensors(tensors, "dare_ties", parameters=params, base_index=0)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_per_model_parameters_follow_entry_ids():
    """merge_group receives per-model values keyed by entry id, whatever the ids' order."""
    base, first, second = _inputs(3)
    group = TensorGroup.from_tensors([second, base, first], ids=["b", "base", "a"], base_index=1)
    method = registry.get("ties")
    params = {"weight": {"a": 0.9, "b": 0.2}, "density": {"a": 0.3, "b": 0.8},
              "normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False}
    expected = method.merge_group(group, **params)
    with backend.enabled(), spy() as calls:
        actual = method.merge_group(group, **params)
    assert calls.call_count == 1
    assert_close_fp32(actual, expected)


def test_no_models_besides_the_base_returns_the_base():
    base = _inputs(1)[0]
    group = TensorGroup.from_tensors([base], base_index=0)
    params = {"weight": {}, "density": {}, "normalize": True, "rescale": False, "lambda": 1.0,
              "int8_mask": False}
    with backend.enabled():
        assert registry.get("ties").merge_group(group, **params) is base


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per-output"])
def test_linear_batches(uniform):
    """Several outputs in one TensorBatch: one moefuse call when all outputs share the weights,
    one per output otherwise."""
    groups = [TensorGroup.from_tensors(_inputs(3, shape=(16, 8), seed=seed)) for seed in range(3)]
    weights = [[1.0, 2.0, 3.0]] * 3 if uniform else [[1.0, 2.0, 3.0], [0.5, 0.5, 1.0], [2.0, -1.0, 1.0]]
    parameters = {"weight": PerGroupValues(weights)}
    method = registry.get("linear")
    expected = method(groups, parameters=parameters)
    with backend.enabled(), spy() as calls:
        actual = method(groups, parameters=parameters)
    assert calls.call_count == (1 if uniform else 3)
    for got, want in zip(actual, expected):
        assert_close_fp32(got, want)


def test_slerp_batch_with_one_t_per_output():
    base, other = (torch.stack(pair) for pair in zip(*(_inputs(2, shape=(32,), seed=s) for s in range(4))))
    batch = TensorBatch((base, other), base_index=0)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    method = registry.get("slerp")
    expected = method.merge_batch(batch, t=t)
    with backend.enabled(), spy() as calls:
        actual = method.merge_batch(batch, t=t)
    assert calls.call_count == 4
    assert_close_fp32(actual, expected)


def test_inputs_moefuse_declines_run_mergekits_code():
    """float64, NaN and autograd inputs give exactly mergekit's result."""
    float64 = [t.double() for t in _inputs(4)]
    with_nan = _inputs(4)
    with_nan[1][0, 0] = float("nan")
    for tensors in (float64, with_nan):
        expected = _call("task_arithmetic", tensors)
        with backend.enabled():
            actual = _call("task_arithmetic", tensors)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual.nan_to_num(), expected.nan_to_num())

    leaves = [t.requires_grad_() for t in _inputs(3)]
    with backend.enabled(), spy() as calls:
        merged = mergekit_merge_tensors(leaves, "linear", parameters={"weight": [1.0, 1.0, 2.0]})
    merged.sum().backward()
    assert calls.call_count == 0
    assert torch.allclose(leaves[2].grad, torch.full_like(leaves[2], 0.5))


def test_methods_moefuse_lacks_keep_mergekits_code():
    tensors = _inputs(2)
    params = {}
    expected = mergekit_merge_tensors(tensors, "arcee_fusion", parameters=params, base_index=0)
    with backend.enabled(), spy() as calls:
        actual = mergekit_merge_tensors(tensors, "arcee_fusion", parameters=params, base_index=0)
    assert calls.call_count == 0
    assert torch.equal(actual, expected)


def _kernel_attributes() -> Dict[str, tuple]:
    """Each registered method's kernel attributes: its own merge_group (or None) and implementation."""
    return {
        method.spec.name: (vars(method).get("merge_group"), getattr(method, "implementation", None))
        for method in registry.registered_methods()
    }


def test_enable_replaces_covered_kernels_and_disable_restores_them():
    before = _kernel_attributes()
    backend.enable()
    backend.enable("reference")  # a second call only changes the backend
    during = _kernel_attributes()
    assert backend.is_enabled() and backend.covered_methods() == COVERED
    for name in before:
        assert (during[name] != before[name]) == (name in COVERED), name
    backend.disable()
    after = _kernel_attributes()
    assert not backend.is_enabled() and backend.covered_methods() == ()
    for name, (merge_group, implementation) in before.items():
        assert after[name][0] is merge_group and after[name][1] is implementation, name
    gta = registry.get("ties")
    assert "merge_group" not in vars(gta)
    assert gta.merge_group.__func__ is type(gta).merge_group


def test_enabled_context_restores_the_previous_state():
    with backend.enabled("reference"):
        with backend.enabled("cpu"):
            assert backend.is_enabled()
        assert backend.is_enabled()
    assert not backend.is_enabled()
    with pytest.raises(MergeConfigError, match="unknown backend"):
        backend.enable("gpu")


# --- whole merges through mergekit's run_merge and the moefuse-mergekit command ---------------

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Dict[str, str]:
    """A tiny Llama base and two fine-tunes of it (the base plus noise), as safetensors."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    paths = {}
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    for index, name in enumerate(["base", "tuned_a", "tuned_b"]):
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                noise = 0.02 * index * torch.randn_like(parameter)
                parameter.copy_(original[parameter_name] + noise)
        model.save_pretrained(root / name, safe_serialization=True)
        paths[name] = str(root / name)
    return paths


def _config(method: str, paths: Dict[str, str]) -> dict:
    """A mergekit YAML config (as a dict) for `method` over the tiny checkpoints, in fp32."""
    models = {
        "ties": [("tuned_a", {"weight": 0.7, "density": 0.4}), ("tuned_b", {"weight": 0.5, "density": 0.7})],
        "task_arithmetic": [("tuned_a", {"weight": 0.6}), ("tuned_b", {"weight": 0.4})],
        "linear": [("base", {"weight": 0.2}), ("tuned_a", {"weight": 0.5}), ("tuned_b", {"weight": 0.3})],
        "slerp": [("base", {}), ("tuned_a", {})],
        "nuslerp": [("tuned_a", {"weight": 0.4}), ("tuned_b", {"weight": 0.6})],
        "karcher": [("tuned_a", {}), ("tuned_b", {})],  # mergekit adds the base as a third input
    }[method]
    config = {
        "merge_method": method,
        "dtype": "float32",
        "models": [{"model": paths[name], "parameters": params} for name, params in models],
    }
    if method != "linear":
        config["base_model"] = paths["base"]
    if method == "slerp":
        config["parameters"] = {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}
    return config


def _merge(config: dict, out: Path) -> Dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(copy_tokenizer=False))
    return _load(out)


def _load(folder: Path) -> Dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear", "slerp", "nuslerp", "karcher"])
def test_run_merge_matches_mergekit(method, checkpoints, tmp_path):
    config = _config(method, checkpoints)
    expected = _merge(config, tmp_path / "mergekit")
    with backend.enabled(), spy() as calls:
        actual = _merge(config, tmp_path / "moefuse")
    assert calls.call_count > 0
    assert {c.args[2] for c in calls.call_args_list} == {method}
    assert actual.keys() == expected.keys() and len(expected) == 2 * 9 + 3
    for name in expected:
        assert actual[name].dtype == expected[name].dtype == torch.float32, name
        assert_close_fp32(actual[name], expected[name])


def test_console_entry_point_runs_a_yaml_config(checkpoints, tmp_path):
    config_file = tmp_path / "merge.yml"
    config_file.write_text(yaml.safe_dump(_config("ties", checkpoints)))
    out = tmp_path / "out"
    argv = ["moefuse-mergekit", str(config_file), str(out), "--no-copy-tokenizer"]
    with mock.patch.object(sys, "argv", argv), spy() as calls, pytest.raises(SystemExit) as exit_info:
        backend.main()
    assert exit_info.value.code == 0
    assert calls.call_count > 0 and backend.is_enabled()
    assert (out / "config.json").exists()
    backend.disable()
    expected = _merge(_config("ties", checkpoints), tmp_path / "mergekit")
    actual = _load(out)
    for name in expected:
        assert_close_fp32(actual[name], expected[name])
