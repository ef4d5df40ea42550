"""The fast backends (C++ CPU, Triton) against the plain PyTorch reference, method by method.

fp32 within 1e-6 relative, bf16/fp16 within 1 ulp of the output (the backends round the same
fp32 value; only the order of fp32 sums of L1 norms and Gram entries may differ). Triton runs
natively on a GPU and interpreted on CPU (TRITON_INTERPRET=1, small sizes).
"""

from __future__ import annotations

import pytest
import torch

import moefuse
from moefuse.ops import backends, select
from tests.helpers import DEVICE, assert_merge_close, method_operands, operand_scale

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAST_BACKENDS = ["cpu", "triton"]
METHOD_PARAMS = {
    "task_arithmetic": dict(weight=[1.0, -0.5, 0.7], **{"lambda": 0.6}),
    "ties": dict(weight=[1.0, 0.6, 0.8], density=[0.3, 0.5, 0.9]),
    "dare_ties": dict(weight=[1.0, 0.5, 0.7], density=[0.4, 0.6, 0.2], seed=3),
    "dare_linear": dict(weight=[0.3, 0.3, 0.4], density=0.5, seed=11, rescale_mode="inverse_density"),
    "breadcrumbs": dict(weight=[1.0, 0.5, 0.7], density=0.6, gamma=0.1),
    "breadcrumbs_ties": dict(weight=[1.0, 0.5, 0.7], density=0.5, gamma=0.05, rescale=True),
    "linear": dict(weight=[1.0, 2.0, 0.5]),
    "passthrough": dict(scale=-0.7),
    "slerp": dict(t=0.4),
    "model_stock": {},
    "nuslerp": dict(weight=[0.4, 0.9]),
    "nuslerp_vectors": dict(weight=[0.4, 0.9], nuslerp_flatten=False),
    "nuslerp_columns": dict(weight=[0.4, 0.9], nuslerp_flatten=False, nuslerp_row_wise=True),
    "multislerp": dict(weight=[0.3, 0.5, 0.9]),
    "karcher": dict(max_iter=30),
    "nearswap": dict(t=0.02),
    "sce": dict(select_topk=0.4),
}


def method_of(case: str) -> str:
    """The method a METHOD_PARAMS case runs ("nuslerp_vectors" runs nuslerp)."""
    return case.split("_vectors")[0].split("_columns")[0]


def _device_for(backend: str) -> str:
    if backend == "cpu":
        if not backends.available("cpu"):
            pytest.fail(f"C++ extension missing: {backends.cpu_unavailable_reason()}")
        return "cpu"
    if not backends.available("triton"):
        pytest.skip("Triton backend unavailable")
    return DEVICE


def _inputs(shape, dtype, device, n=3, seed=0, spread=0.05):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    tensors = [base + spread * torch.randn(shape, generator=generator) for _ in range(n)]
    return base.to(dtype).to(device), [t.to(dtype).to(device) for t in tensors]


def _merge_both(backend, base, tensors, method, **params):
    base, tensors = method_operands(method, base, tensors)
    expected = moefuse.merge_tensors(base, tensors, method, backend="reference", **params)
    actual = moefuse.merge_tensors(base, tensors, method, backend=backend, **params)
    scale = operand_scale(*(t.cpu() for t in ([base] if base is not None else []) + tensors))
    assert_merge_close(actual.cpu(), expected.cpu(), scale=scale)
    return actual


def _shapes(backend):
    small = [(), (1,), (0,), (7, 13), (3, 5, 17)]
    return small + ([(300, 70)] if backend == "cpu" or DEVICE == "cuda" else [(40, 33)])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_backend_matches_reference(backend, dtype, method):
    device = _device_for(backend)
    for shape in _shapes(backend):
        if method == "model_stock" and len(shape) == 0:
            continue
        base, tensors = _inputs(shape, dtype, device)
        _merge_both(backend, base, tensors, method_of(method), **METHOD_PARAMS[method])


ROW_LOCAL_PARAMS = {
    "model_stock": dict(filter_wise=True),
    "della": dict(weight=[1.0, 0.5, 0.7], density=0.5, epsilon=0.1, seed=5),
}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", sorted(ROW_LOCAL_PARAMS))
def test_row_local_method_matches_reference(backend, dtype, method):
    """In memory too, the CPU backend runs DELLA and filter-wise Model Stock in its row kernels
    (one block of rows per thread); rows of one entry, empty rows and empty tensors included."""
    device = _device_for(backend)
    for shape in _shapes(backend) + [(2, 1), (4, 0), (0, 6)]:
        if method == "model_stock" and len(shape) == 0:
            continue
        base, tensors = _inputs(shape, dtype, device)
        _merge_both(backend, base, tensors, method, **ROW_LOCAL_PARAMS[method])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_filter_wise_model_stock_edges(backend):
    """Rows whose task vectors are zero keep the base exactly; a NaN (allowed) poisons its own
    row only, as in the reference; identical task vectors give t = 1 (the models' mean)."""
    device = _device_for(backend)
    base, tensors = _inputs((6, 40), torch.float32, device)
    for t in tensors:
        t[2] = base[2]
    out = _merge_both(backend, base, tensors, "model_stock", filter_wise=True)
    assert torch.equal(out[2], base[2])
    tensors[1][4, 7] = float("nan")
    expected = moefuse.merge_tensors(base, tensors, "model_stock", backend="reference", filter_wise=True,
                                     allow_nonfinite=True)
    actual = moefuse.merge_tensors(base, tensors, "model_stock", backend=backend, filter_wise=True,
                                   allow_nonfinite=True)
    assert torch.isnan(actual[4]).all() and torch.isfinite(torch.cat([actual[:4], actual[5:]])).all()
    assert_merge_close(actual.cpu(), expected.cpu())
    same = _merge_both(backend, base, [tensors[0]] * 3, "model_stock", filter_wise=True)
    assert_merge_close(same.cpu(), tensors[0].cpu())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_magnitude_ties_at_threshold(backend, dtype, method, monkeypatch):
    """Quantized deltas make many equal magnitudes straddle the cut; small tie chunks and
    level-1 ranges make the cut search cross their boundaries."""
    device = _device_for(backend)
    monkeypatch.setattr(select, "TIE_CHUNK", 64)
    monkeypatch.setattr(select, "MIN_RANGE", 100)  # several level-1 ranges (CPU backend)
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(37, 29, generator=generator)
    tensors = [base + 0.01 * torch.randint(-3, 4, base.shape, generator=generator) for _ in range(3)]
    base, tensors = base.to(dtype).to(device), [t.to(dtype).to(device) for t in tensors]
    params = dict(density=[0.3, 0.5, 0.71])
    if method == "breadcrumbs_ties":
        params["gamma"] = 0.13
    _merge_both(backend, base, tensors, method, **params)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "params",
    [
        dict(density=0.0),
        dict(density=1.0),
        dict(density=[0.0, 1.0, 0.5]),
        dict(weight=[1.0, -1.0, 0.0]),  # weights summing to zero
        dict(weight=0.0),
        dict(**{"lambda": 0.0}),
    ],
    ids=str,
)
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties", "breadcrumbs"])
def test_parameter_edges(backend, params, method):
    device = _device_for(backend)
    base, tensors = _inputs((11, 23), torch.float32, device)
    if method == "task_arithmetic":
        params = {k: v for k, v in params.items() if k != "density"}
    _merge_both(backend, base, tensors, method, **params)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "breadcrumbs_ties"])
def test_degenerate_inputs(backend, method):
    device = _device_for(backend)
    base, tensors = _inputs((9, 31), torch.bfloat16, device)
    params = {} if method == "task_arithmetic" else dict(density=0.4)
    zero_deltas = _merge_both(backend, base, [base.clone(), base.clone()], method, **params)
    assert torch.equal(zero_deltas, base), "all-zero deltas must return the base"
    _merge_both(backend, base, [tensors[0]] * 3, method, **params)  # identical inputs
    _merge_both(backend, base, tensors[:1], method, **params)  # one model


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_out_dtype(backend, out_dtype):
    device = _device_for(backend)
    base, tensors = _inputs((5, 40), torch.bfloat16, device)
    actual = moefuse.merge_tensors(base, tensors, "ties", density=0.5, backend=backend, out_dtype=out_dtype)
    expected = moefuse.merge_tensors(base, tensors, "ties", density=0.5, backend="reference", out_dtype=out_dtype)
    assert actual.dtype == out_dtype
    assert_merge_close(actual.cpu(), expected.cpu())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_inputs(backend):
    device = _device_for(backend)
    base, tensors = _inputs((30, 20), torch.float32, device)
    transposed = [t.T for t in tensors]
    _merge_both(backend, base.T, transposed, "ties", density=0.5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kernels_write_into_a_given_out(backend):
    """fused_gta and weighted_sum fill a given contiguous `out` and return it; an `out` of the
    wrong size or dtype is refused."""
    from moefuse.ops.gta_pipeline import encode_rules
    from moefuse.ops.plan import KEEP_ALL, GtaPlan, KeepRule

    device = _device_for(backend)
    impl = backends.cpu_backend(warn_if_missing=False) if backend == "cpu" else backends.triton_backend()
    base, tensors = _inputs((1000,), torch.bfloat16, device)
    plan = GtaPlan((KeepRule(KEEP_ALL),) * 3, (1.0,) * 3, consensus=True, normalize=True, lam=1.0, rescale=None, seed=0)
    rules = encode_rules(plan, {})

    def fused(**out):
        return impl.fused_gta(base, tensors, rules, 0, [1.0] * 3, [1.0] * 3, True, True, 3.0, 1.0, torch.float32, 0,
                              **out)[0]

    out = torch.empty(1000, dtype=torch.float32, device=device)
    assert fused(out=out).data_ptr() == out.data_ptr() and torch.equal(out, fused())
    summed = torch.empty(1000, dtype=torch.bfloat16, device=device)
    assert impl.weighted_sum(tensors, [0.5, 0.25, 0.25], torch.bfloat16, out=summed)[0].data_ptr() == summed.data_ptr()
    assert torch.equal(summed, impl.weighted_sum(tensors, [0.5, 0.25, 0.25], torch.bfloat16)[0])
    for wrong in (torch.empty(999, dtype=torch.float32, device=device), torch.empty(1000, dtype=torch.float16,
                                                                                     device=device)):
        with pytest.raises((RuntimeError, ValueError), match="out"):
            fused(out=wrong)


def test_huge_1d_tensor_on_cpu():
    """2^24 + 3 entries: past any tile or chunk boundary, fp32 with ties at the cut."""
    _device_for("cpu")
    n = (1 << 24) + 3
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(n, generator=generator)
    tensors = [base + 0.01 * torch.randint(-50, 51, (n,), generator=generator) for _ in range(2)]
    _merge_both("cpu", base, tensors, "ties", density=[0.2, 0.35])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_sparse_task_vectors(backend, dtype, method):
    """Most deltas exactly zero (frozen weights) and a density above the changed fraction: the
    trim threshold falls on magnitude 0."""
    device = _device_for(backend)
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(41, 37, generator=generator)
    tensors = []
    for _ in range(3):
        changed = torch.rand(base.shape, generator=generator) < 0.2
        tensors.append(base + changed * 0.05 * torch.randn(base.shape, generator=generator))
    base, tensors = base.to(dtype).to(device), [t.to(dtype).to(device) for t in tensors]
    params = dict(density=[0.5, 0.3, 0.9], rescale=True)
    if method == "breadcrumbs_ties":
        params["gamma"] = 0.05
    _merge_both(backend, base, tensors, method, **params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,range_size", [(1, 64), (5000, 64), (5000, 1000), (3000, 4096), (70001, 3000)])
def test_cpu_level1_histograms_per_range(dtype, n, range_size):
    """Per-range level-1 counts equal bincount of the magnitude keys, whatever the range size
    (not a multiple of the kernel's tile) and however the threads split the tiles."""
    if not backends.available("cpu"):
        pytest.fail(f"C++ extension missing: {backends.cpu_unavailable_reason()}")
    from moefuse.ops import merge_cpu

    generator = torch.Generator().manual_seed(n)
    base, *inputs = [torch.randn(n, generator=generator).to(dtype) for _ in range(3)]
    hist = merge_cpu.histogram_level1(base, inputs, [0, 1], range_size)
    assert hist.shape == (2, -(-n // range_size), select.LEVEL1_BINS)
    shift = select.level1_shift(dtype)
    for row, x in enumerate(inputs):
        keys = select.magnitude_keys(x - base) >> shift
        for r in range(hist.shape[1]):
            expected = torch.bincount(keys[r * range_size:(r + 1) * range_size], minlength=select.LEVEL1_BINS)
            assert torch.equal(hist[row, r].long(), expected)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "karcher", "model_stock"])
def test_gram_of_huge_finite_entries_is_summed_again_in_fp64(backend, method):
    """Entries near 1e20: their products overflow fp32 Gram sums; the merge stays finite and equal
    to the reference's (fp64 sums), no NaN/Inf error."""
    device = _device_for(backend)
    base, tensors = _inputs((40, 33), torch.float32, device)
    base, tensors = base * 1e20, [t * 1e20 for t in tensors]
    out = _merge_both(backend, base, tensors, method_of(method), **METHOD_PARAMS[method])
    assert torch.isfinite(out).all()
