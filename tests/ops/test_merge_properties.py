"""Algebraic properties of the merge methods, checked with hypothesis.

Inputs are small multiples of 1/8, so every fp32 sum of them is exact and the properties hold
whatever the order of summation (Model Stock's weights are not dyadic: its cases are kept to
|t| <= 1, where fp32 rounding stays below the tolerance).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import moefuse
from moefuse.ops.merge_reference import gram_reference, model_stock_t

SYMMETRIC = ["task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties", "linear", "model_stock"]
BACKENDS = ["reference", "cpu"]


@st.composite
def merge_inputs(draw, min_models=1, max_models=4):
    n = draw(st.integers(1, 40))
    models = draw(st.integers(min_models, max_models))
    values = st.integers(-16, 16)
    base = torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32) / 8
    tensors = [
        base + torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32) / 8
        for _ in range(models)
    ]
    return base, tensors


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(inputs=merge_inputs(1, 1), weight=st.sampled_from([0.5, 1.0, 2.0]), lam=st.sampled_from([0.5, 1.0]))
def test_ties_full_density_one_model_is_task_arithmetic(backend, inputs, weight, lam):
    base, tensors = inputs
    ties = moefuse.merge_tensors(
        base, tensors, "ties", density=1.0, weight=weight, normalize=False, backend=backend, **{"lambda": lam}
    )
    arithmetic = moefuse.merge_tensors(
        base, tensors, "task_arithmetic", weight=weight, backend=backend, **{"lambda": lam}
    )
    assert torch.equal(ties, arithmetic)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della_linear"])
@settings(max_examples=25, deadline=None)
@given(inputs=merge_inputs())
def test_lambda_zero_returns_the_base(backend, method, inputs):
    base, tensors = inputs
    out = moefuse.merge_tensors(base, tensors, method, backend=backend, **{"lambda": 0.0})
    assert torch.equal(out, base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", SYMMETRIC)
@settings(max_examples=25, deadline=None)
@given(inputs=merge_inputs(2, 4), data=st.data())
def test_input_order_does_not_matter(backend, method, inputs, data):
    base, tensors = inputs
    count = len(tensors)
    weights = data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0]), min_size=count, max_size=count))
    densities = data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0]), min_size=count, max_size=count))
    order = data.draw(st.permutations(range(count)))
    params = {"weight": weights}
    if method in ("ties", "breadcrumbs_ties"):
        params["density"] = densities
    if method == "model_stock":
        params = {}
    if method == "dare_ties":  # masks follow the model index, so only full masks commute
        params["density"] = [1.0] * count
    permuted = {k: [v[i] for i in order] for k, v in params.items()}
    use_base = None if method == "linear" else base
    if method == "model_stock":
        if count < 2:
            return
        # Nearly opposite task vectors make Model Stock's t = N cos / (1 + (N - 1) cos) large, and
        # out = (1 - t) base + (t / N) sum x_i then cancels terms of size |t|: fp32 rounding of
        # those terms, not the order of the inputs, would decide the last digits.
        t = model_stock_t(gram_reference(tensors, base)).item()
        assume(abs(t) <= 1)
    first = moefuse.merge_tensors(use_base, tensors, method, backend=backend, **params)
    second = moefuse.merge_tensors(use_base, [tensors[i] for i in order], method, backend=backend, **permuted)
    torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-6)
