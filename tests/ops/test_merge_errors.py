"""Bad inputs get clear errors that name the input, shape, dtype or option."""

from __future__ import annotations

import pytest
import torch

import moefuse
from moefuse import MergeConfigError, MergeInputError
from tests.helpers import DEVICE


def _pair(shape=(4, 5), dtype=torch.float32):
    base = torch.randn(shape, dtype=dtype)
    return base, [base + 0.1, base - 0.1]


def test_unknown_method_lists_valid_ones():
    base, tensors = _pair()
    with pytest.raises(MergeConfigError, match="unknown merge method 'tie'.*valid methods:.*ties"):
        moefuse.merge_tensors(base, tensors, "tie")


def test_unknown_parameter_lists_valid_ones():
    base, tensors = _pair()
    with pytest.raises(MergeConfigError, match="no parameter 'densty'.*valid parameters:.*density"):
        moefuse.merge_tensors(base, tensors, "ties", densty=0.5)


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(density=1.5), "'density' must be <= 1.0"),
        (dict(density=-0.1), "'density' must be >= 0.0"),
        (dict(density=[0.5]), "'density' has 1 values but there are 2 models"),
        (dict(weight="heavy"), "'weight' must be a number"),
        (dict(normalize="yes"), "'normalize' must be true or false"),
        (dict(rescale_mode="l2"), "'rescale_mode' must be one of"),
        (dict(weight=float("nan")), "'weight' must be finite"),
    ],
)
def test_bad_parameter_values(params, message):
    base, tensors = _pair()
    with pytest.raises(MergeConfigError, match=message):
        moefuse.merge_tensors(base, tensors, "ties", **params)


def test_slerp_requires_t_and_one_model():
    base, tensors = _pair()
    with pytest.raises(MergeConfigError, match="parameter 't' is required"):
        moefuse.merge_tensors(base, tensors[:1], "slerp")
    with pytest.raises(MergeInputError, match="at most 1 model"):
        moefuse.merge_tensors(base, tensors, "slerp", t=0.5)


def test_della_epsilon_range():
    base, tensors = _pair()
    with pytest.raises(MergeConfigError, match="density 0.9 \\+/- epsilon 0.2 must stay inside"):
        moefuse.merge_tensors(base, tensors, "della", density=0.9, epsilon=0.2)


def test_shape_mismatch_names_the_tensor():
    base, tensors = _pair()
    with pytest.raises(MergeInputError, match=r"tensors\[1\] has shape \(5, 4\) but base has \(4, 5\)"):
        moefuse.merge_tensors(base, [tensors[0], tensors[1].T.contiguous()], "ties")


def test_dtype_mismatch_names_the_tensor():
    base, tensors = _pair()
    with pytest.raises(MergeInputError, match=r"tensors\[0\] has dtype torch.float16 but base has torch.float32"):
        moefuse.merge_tensors(base, [tensors[0].half(), tensors[1]], "ties")


def test_unsupported_dtype():
    base = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(MergeInputError, match="dtype torch.float64; supported: float32, bfloat16, float16"):
        moefuse.merge_tensors(base, [base], "ties")


def test_base_rules():
    base, tensors = _pair()
    with pytest.raises(MergeInputError, match="needs a base tensor"):
        moefuse.merge_tensors(None, tensors, "ties")
    with pytest.raises(MergeInputError, match="uses no base"):
        moefuse.merge_tensors(base, tensors, "linear")
    with pytest.raises(MergeInputError, match="is a list, not a torch.Tensor"):
        moefuse.merge_tensors(base, [[1.0, 2.0]], "ties")


def test_spherical_methods_and_nearswap_check_their_inputs():
    base, tensors = _pair()
    with pytest.raises(MergeConfigError, match="method 'nuslerp': parameter 'weight' is required"):
        moefuse.merge_tensors(base, tensors, "nuslerp")
    with pytest.raises(MergeInputError, match="'nuslerp' needs at least 2 model tensor"):
        moefuse.merge_tensors(base, tensors[:1], "nuslerp", weight=1.0)
    with pytest.raises(MergeInputError, match="'karcher' uses no base; pass base=None"):
        moefuse.merge_tensors(base, tensors, "karcher")
    with pytest.raises(MergeConfigError, match="'multislerp': the weights sum to zero.*normalize_weights: false"):
        moefuse.merge_tensors(base, tensors, "multislerp", weight=[1.0, -1.0])
    with pytest.raises(MergeConfigError, match="'max_iter' must be an integer"):
        moefuse.merge_tensors(None, tensors, "karcher", max_iter=2.5)
    with pytest.raises(MergeConfigError, match="method 'nearswap': parameter 't' is required"):
        moefuse.merge_tensors(base, tensors[:1], "nearswap")


def test_multislerp_of_cancelling_directions():
    """Three points whose weighted unit vectors cancel have no spherical mean (an error); two fall
    back to linear interpolation; points that are all zero give zero (the base)."""
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, -1.0])
    with pytest.raises(MergeInputError, match="weighted sum of the unit vectors is zero"):
        moefuse.merge_tensors(None, [a, -a, 2 * a], "multislerp", weight=[1.0, 1.0, 0.0])
    pair = moefuse.merge_tensors(None, [a, -2 * a], "multislerp", weight=[1.0, 1.0])
    assert torch.allclose(pair, -0.5 * a)
    assert torch.equal(moefuse.merge_tensors(base, [base, base, base], "multislerp", weight=1.0), base)


def test_linear_weights_summing_to_zero():
    _, tensors = _pair()
    with pytest.raises(MergeConfigError, match="weights sum to zero"):
        moefuse.merge_tensors(None, tensors, "linear", weight=[1.0, -1.0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_linear", "della", "slerp", "model_stock", "linear",
                                    "nuslerp", "nuslerp_vectors", "karcher", "nearswap", "sce"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["base", "model"])
def test_nonfinite_inputs_raise_unless_allowed(backend, method, bad, where):
    device = DEVICE if backend == "triton" else "cpu"
    base, tensors = _pair()
    if where == "base":
        base[1, 2] = bad
        name = "base"
    else:
        tensors[1][0, 0] = bad
        name = r"tensors\[1\]"
    params = {"slerp": dict(t=0.3), "nearswap": dict(t=0.05), "nuslerp": dict(weight=[0.4, 0.6]),
              "nuslerp_vectors": dict(weight=[0.4, 0.6], nuslerp_flatten=False)}.get(method, {})
    method = method.removesuffix("_vectors")
    if method in ("linear", "karcher"):
        base, tensors, name = None, [base, *tensors], ("tensors\\[0\\]" if where == "base" else "tensors\\[2\\]")
    if method in ("slerp", "nearswap"):
        tensors = tensors[1:] if where == "model" else tensors[:1]
        name = "base" if where == "base" else r"tensors\[0\]"
    base = base.to(device) if base is not None else None
    tensors = [t.to(device) for t in tensors]
    with pytest.raises(MergeInputError, match=f"{name} holds 1 NaN/Inf value"):
        moefuse.merge_tensors(base, tensors, method, backend=backend, **params)
    out = moefuse.merge_tensors(base, tensors, method, backend=backend, allow_nonfinite=True, **params)
    assert not torch.isfinite(out).all()


def test_bad_backend_and_out_dtype():
    base, tensors = _pair()
    with pytest.raises(MergeConfigError, match="unknown backend 'gpu'"):
        moefuse.merge_tensors(base, tensors, "ties", backend="gpu")
    with pytest.raises(MergeConfigError, match="out_dtype torch.int8 is not supported"):
        moefuse.merge_tensors(base, tensors, "ties", out_dtype=torch.int8)
    with pytest.raises(MergeConfigError, match="out_dtype 'half' is not supported; use float32, bfloat16 or float16"):
        moefuse.merge_tensors(base, tensors, "ties", out_dtype="half")
    assert moefuse.merge_tensors(base, tensors, "ties", out_dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(MergeConfigError, match="compute_dtype torch.float64 is not supported"):
        moefuse.merge_streamed(base, tensors, "ties", lambda piece: None, piece_size=1, compute_dtype=torch.float64)


def test_lambda_may_be_spelled_lambda_but_not_both():
    base, tensors = _pair()
    assert torch.equal(moefuse.merge_tensors(base, tensors, "ties", lambda_=0.5),
                       moefuse.merge_tensors(base, tensors, "ties", **{"lambda": 0.5}))
    with pytest.raises(MergeConfigError, match="give 'lambda_' or 'lambda' \\(the same parameter\\), not both"):
        moefuse.merge_tensors(base, tensors, "ties", lambda_=0.5, **{"lambda": 0.5})
