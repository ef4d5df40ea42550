"""The Triton backend against the PyTorch reference, merge by merge and kernel by kernel.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so the sizes here stay small.
"""

import pytest
import torch

pytest.importorskip("triton")

import moefuse  # noqa: E402
from moefuse.kernels import merge_gta  # noqa: E402
from moefuse.ops import merge_triton, select  # noqa: E402
from moefuse.ops.gta_pipeline import encode_rules  # noqa: E402
from moefuse.ops.merge_reference import (  # noqa: E402
    gram_reference,
    keep_mask,
    magnitude_keys,
    model_stock_reference,
    rank_order,
    weighted_sum_reference,
)
from moefuse.ops.philox import philox_uint32  # noqa: E402
from moefuse.ops.plan import KEEP_ALL, KEEP_NONE, KEEP_RANDOM, KEEP_RANKS, GtaPlan, KeepRule  # noqa: E402
from tests.helpers import assert_merge_close  # noqa: E402

if merge_gta.interpreted():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "no GPU, and moefuse.kernels was imported before TRITON_INTERPRET=1 was set; "
        "run with TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
METHODS = [name for name in moefuse.method_names() if name not in ("della", "della_linear")]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_case(kind: str, shape, count: int, dtype: torch.dtype, seed: int = 0):
    """(base, inputs) on DEVICE. kinds: random deltas, zero deltas, identical inputs, or inputs
    quantized to a few deltas (many magnitude ties)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    if kind == "quantized":
        base = torch.randint(-2, 3, shape, generator=generator).float() * 0.5
        inputs = [base + torch.randint(-3, 4, shape, generator=generator).float() * 0.01 for _ in range(count)]
    elif kind == "zero":
        inputs = [base.clone() for _ in range(count)]
    elif kind == "identical":
        inputs = [base + 0.01 * torch.randn(shape, generator=generator)] * count
    else:
        inputs = [base + 0.01 * torch.randn(shape, generator=generator) for _ in range(count)]
    return base.to(dtype).to(DEVICE), [x.to(dtype).to(DEVICE) for x in inputs]


def merge_args(method: str, base, inputs, density: float, weights):
    """(base, tensors, params) for `method`, adapting the model count to what it accepts."""
    if method == "slerp":
        return base, inputs[:1], {"t": 0.3}
    if method == "model_stock":
        return base, (inputs * 2)[: max(2, len(inputs))], {}
    if method == "linear":
        return None, inputs, {"weight": list(weights), "normalize": abs(sum(weights)) > 1e-6}
    if method == "passthrough":
        return None, inputs[:1], {"scale": weights[0]}
    if method == "nuslerp":
        return base, (inputs * 2)[:2], {"weight": [0.4, 0.9]}
    if method == "multislerp":
        return base, inputs, {"weight": [0.4, 0.9, 0.3][: len(inputs)]}
    if method == "karcher":
        return None, [base, *inputs], {}
    if method == "nearswap":
        return base, inputs[:1], {"t": 0.01}
    if method == "sce":
        return base, inputs, {"select_topk": density}
    params = {"weight": list(weights), "density": density, "lambda": 0.8}
    if method.startswith("breadcrumbs"):
        params["gamma"] = 0.1
    if method.startswith("dare"):
        params["seed"] = 1234
    return base, inputs, params


def check_merge(base, tensors, method: str, **params) -> torch.Tensor:
    """Merge with the Triton backend; check it against the reference (fp32: 1e-6 relative;
    bf16/fp16: one ulp of the output dtype)."""
    fast = moefuse.merge_tensors(base, tensors, method, backend="triton", **params)
    reference = moefuse.merge_tensors(base, tensors, method, backend="reference", **params)
    assert fast.shape == reference.shape
    assert_merge_close(fast.cpu(), reference.cpu())
    return fast


# ---------------------------------------------------------------------------------------------
# whole merges against the reference
# ---------------------------------------------------------------------------------------------

SCENARIOS = {
    # id: (kind, shape, models, density, weights)
    "sparse-300x70": ("random", (300, 70), 3, 0.3, [1.0, -0.5, 0.7]),
    "dense-7x13": ("random", (7, 13), 2, 1.0, [0.6, 0.4]),
    "drop-all-3x5x17": ("random", (3, 5, 17), 3, 0.0, [1.0, 1.0, 1.0]),
    "single-1": ("random", (1,), 1, 0.3, [0.8]),
    "scalar-zero-sum": ("random", (), 2, 0.3, [1.0, -1.0]),
    "empty": ("random", (0,), 2, 0.3, [1.0, 0.5]),
    "zero-deltas": ("zero", (7, 13), 3, 0.3, [1.0, 0.5, 0.25]),
    "identical": ("identical", (3, 5, 17), 3, 0.3, [0.5, 0.5, -0.25]),
    "ties-zero-sum": ("quantized", (40, 50), 3, 0.3, [1.0, -0.5, -0.5]),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_matches_reference(method, dtype, scenario, monkeypatch):
    kind, shape, count, density, weights = SCENARIOS[scenario]
    if kind != "random":
        monkeypatch.setattr(select, "TIE_CHUNK", 64)  # ties spread over several chunks
    base, inputs = make_case(kind, shape, count, dtype)
    base, tensors, params = merge_args(method, base, inputs, density, weights)
    check_merge(base, tensors, method, **params)


@pytest.mark.parametrize(
    "method, params",
    [
        ("task_arithmetic", {"normalize": True, "weight": [0.3, 0.9, -0.2]}),
        ("task_arithmetic", {"normalize": True, "weight": [0.5, -0.5, 0.0]}),  # |sum| < 1e-8 -> 1
        ("ties", {"density": 0.5, "rescale": True, "normalize": False, "lambda": 1.5}),
        ("ties", {"density": [0.2, 0.9, 1.0], "rescale": True, "rescale_mode": "inverse_density"}),
        ("dare_ties", {"density": 0.6, "rescale": False, "normalize": True, "seed": 2**40 + 3}),
        ("dare_linear", {"density": [0.1, 0.5, 0.0], "rescale_mode": "inverse_density"}),
        ("breadcrumbs_ties", {"density": 0.4, "gamma": [0.0, 0.3, 0.05], "rescale": True}),
        ("breadcrumbs", {"density": 0.95, "gamma": 0.1}),  # density + gamma > 1: no bottom left
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gta_options(method, params, dtype):
    base, inputs = make_case("random", (31, 33), 3, dtype, seed=1)
    check_merge(base, inputs, method, **params)


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
     (torch.float16, torch.bfloat16)],
    ids=["fp32-bf16", "fp32-fp16", "bf16-fp32", "fp16-bf16"],
)
@pytest.mark.parametrize("method", ["ties", "dare_linear", "linear", "model_stock", "slerp"])
def test_out_dtype(method, dtype, out_dtype):
    base, inputs = make_case("random", (9, 70), 2, dtype, seed=2)
    base, tensors, params = merge_args(method, base, inputs, 0.4, [0.7, 0.6])
    check_merge(base, tensors, method, out_dtype=out_dtype, **params)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dare_keep_rate_and_seeds(dtype):
    n, density = 20000, 0.3
    base = torch.zeros(n, dtype=dtype, device=DEVICE)
    ones = torch.ones(n, dtype=dtype, device=DEVICE)

    def kept(seed, count=1):
        out = moefuse.merge_tensors(base, [ones] * count, "dare_linear", backend="triton", density=density,
                                    rescale=False, seed=seed)
        return out.float().cpu()  # number of models keeping each entry

    first = kept(5)
    tolerance = 4 * (density * (1 - density) / n) ** 0.5
    assert abs(first.mean().item() - density) < tolerance
    assert torch.equal(first, kept(5))
    assert not torch.equal(first, kept(6))
    both = (kept(5, count=2) == 2).float().mean().item()  # models draw independent streams
    assert abs(both - density**2) < 4 * (density**2 * (1 - density**2) / n) ** 0.5


@pytest.mark.gpu
@pytest.mark.skipif(
    DEVICE != "cuda" or torch.cuda.mem_get_info()[0] < 30 * 2**30, reason="needs a GPU with 30 GiB free"
)
def test_offsets_past_two_to_the_32():
    """64-bit offsets: the tail of a 2^32 + 4099 entry merge is stored in place and draws as the
    reference does (Philox counter j >> 2; its high word is tested by
    tests/ops/test_merge_random.py::test_draws_past_the_high_counter_word)."""
    n = 2**32 + 4099
    base = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    ones = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    out = moefuse.merge_tensors(base, [ones], "dare_linear", backend="triton", density=0.5, rescale=False, seed=3)
    tail = torch.arange(n - 5000, n, dtype=torch.int64)
    assert torch.equal(out[n - 5000 :].cpu(), (philox_uint32(3, 0, tail) < 2**31).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# kernels one by one
# ---------------------------------------------------------------------------------------------


def keys_of(base, x) -> torch.Tensor:
    return magnitude_keys((x - base).cpu())


def selection_case(dtype: torch.dtype):
    """Base and three inputs: random deltas, deltas tied on a few values, and the tied ones with
    zero, negative-zero and subnormal deltas at the start."""
    generator = torch.Generator().manual_seed(3)
    n = 3001
    base = torch.randn(n, generator=generator)
    base[n // 2 :] = torch.randint(-2, 3, (n - n // 2,), generator=generator).float() * 0.5
    base[:8] = torch.tensor([0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    random = base + 0.01 * torch.randn(n, generator=generator)
    tied = base + torch.randint(-3, 4, (n,), generator=generator).float() * 0.01
    special = tied.clone()
    special[:8] = torch.finfo(dtype).smallest_normal * torch.tensor([0.0, -0.0, 0.25, -0.5, 1.5, 3.0, 0.0, -1.0])
    return base.to(dtype).to(DEVICE), [x.to(dtype).to(DEVICE) for x in (random, tied, special)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_histogram_level1(dtype):
    base, inputs = selection_case(dtype)
    models = [2, 0, 1]
    hist = merge_triton.histogram_level1(base, inputs, models, 1 << 20).cpu()
    shift = select.level1_shift(dtype)
    for row, i in enumerate(models):
        expected = torch.bincount(keys_of(base, inputs[i]) >> shift, minlength=select.LEVEL1_BINS)
        assert torch.equal(hist[row], expected)


def test_histogram_level2():
    base, inputs = selection_case(torch.float32)
    keys = [keys_of(base, x) for x in inputs]
    models = [1, 2, 2, 0]
    prefixes = [int(keys[1][7] >> 16), int(torch.mode(keys[2] >> 16).values), 0x7F80, int(keys[0][0] >> 16)]
    hist = merge_triton.histogram_level2(base, inputs, models, prefixes).cpu()
    for row, (i, prefix) in enumerate(zip(models, prefixes)):
        inside = keys[i][(keys[i] >> 16) == prefix]
        assert torch.equal(hist[row], torch.bincount(inside & 0xFFFF, minlength=select.LEVEL2_BINS))


@pytest.mark.parametrize("chunk", [64, 100, 5000])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_chunk_counts(dtype, chunk):
    base, inputs = selection_case(dtype)
    keys = [keys_of(base, x) for x in inputs]
    models = [2, 0, 2]
    wanted = [int(torch.mode(keys[2]).values), int(keys[0][11]), 1 << 32]
    counts = merge_triton.chunk_counts(base, inputs, models, wanted, chunk).cpu()
    n = base.numel()
    assert counts.shape == (3, -(-n // chunk))
    for row, (i, key) in enumerate(zip(models, wanted)):
        hits = (keys[i] == key).long()
        expected = torch.stack([hits[c : c + chunk].sum() for c in range(0, n, chunk)])
        assert torch.equal(counts[row], expected)


def ranks_plan(ranges, count: int) -> GtaPlan:
    rules = tuple(KeepRule(KEEP_RANKS, rank_lo=lo, rank_hi=hi) for lo, hi in ranges)
    return GtaPlan(rules, (1.0,) * count, consensus=False, normalize=False, lam=1.0, rescale=None, seed=0)


@pytest.mark.parametrize("kind", ["random", "quantized", "zero"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rank_thresholds(dtype, kind, monkeypatch):
    monkeypatch.setattr(select, "TIE_CHUNK", 64)
    base, inputs = make_case(kind, (1500,), 3, dtype, seed=5)
    n = base.numel()
    plan = ranks_plan([(0, 1), (17, n // 2), (n - 1, n)], 3)
    thresholds = select.rank_thresholds(merge_triton, base, inputs, plan)
    index = torch.arange(n)
    for (i, rank), threshold in thresholds.items():
        keys = keys_of(base, inputs[i])
        inside = (keys > threshold.key) | ((keys == threshold.key) & (index < threshold.cut))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[rank_order((inputs[i] - base).cpu())[:rank]] = True
        if threshold.key == 0:  # which zero deltas count as kept does not matter (select.py)
            inside, expected = inside[keys != 0], expected[keys != 0]
        assert torch.equal(inside, expected), (i, rank, threshold)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_l1_norms(dtype, monkeypatch):
    monkeypatch.setattr(select, "TIE_CHUNK", 64)
    base, inputs = make_case("quantized", (2, 700), 4, dtype, seed=6)
    rules = (KeepRule(KEEP_RANKS, rank_lo=10, rank_hi=600), KeepRule(KEEP_RANDOM, threshold32=int(0.3 * 2**32)),
             KeepRule(KEEP_ALL), KeepRule(KEEP_NONE))
    plan = GtaPlan(rules, (1.0,) * 4, consensus=False, normalize=False, lam=1.0, rescale="l1", seed=2**33 + 9)
    encoded = encode_rules(plan, select.rank_thresholds(merge_triton, base, inputs, plan))
    before, after = merge_triton.l1_norms(base, inputs, encoded, plan.seed, 0)
    assert before.dtype == after.dtype == torch.float64 and before.shape == after.shape == (4,)
    for i, (x, rule) in enumerate(zip(inputs, rules)):
        delta = (x - base).cpu().double().abs()
        mask = keep_mask((x - base).cpu(), rule, plan.seed, i)
        assert before[i].item() == pytest.approx(delta.sum().item(), rel=1e-12)
        assert after[i].item() == pytest.approx((delta * mask).sum().item(), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_count_nonfinite(dtype):
    clean = torch.randn(70, 30).to(dtype)
    dirty = clean.clone()
    dirty[3, 4], dirty[50, 0], dirty[69, 29] = float("nan"), float("inf"), -float("inf")
    dirty[0, 0] = torch.finfo(dtype).max  # large but finite
    tensors = [clean, dirty, dirty.T, torch.tensor(float("nan")).to(dtype), clean[:0]]
    counts = merge_triton.count_nonfinite([t.to(DEVICE) for t in tensors])
    assert counts == [0, 3, 3, 1, 0]


@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gram(dtype, with_base):
    base, inputs = make_case("random", (45, 101), 3, dtype, seed=7)
    base = base if with_base else None
    inputs = [inputs[0], inputs[1].T.contiguous().T, inputs[2]]  # a transposed view is made contiguous
    expected = gram_reference([x.cpu() for x in inputs], base.cpu() if with_base else None)
    result = merge_triton.gram(inputs, base)
    assert result.dtype == torch.float64 and result.device.type == "cpu"
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weighted_sum(dtype, out_dtype):
    _, tensors = make_case("random", (3, 1000), 3, dtype, seed=8)
    coefficients = [0.25, -1.5, 3.0]
    result, nonfinite = merge_triton.weighted_sum(tensors, coefficients, out_dtype)
    assert nonfinite == [0, 0, 0]
    expected = weighted_sum_reference(tensors, coefficients).to(out_dtype)
    assert result.shape == expected.shape
    assert_merge_close(result.cpu(), expected.cpu())


@pytest.mark.parametrize("shape", [(3, 3000), (50, 1), (6, 17), (0, 5)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_model_stock_rows(dtype, shape, monkeypatch):
    """One factor per row: rows longer than a tile (their Gram summed over tiles), rows of one
    entry (every cosine is +-1), short rows, no rows; Gram partials in chunks of a few rows; an
    output dtype of its own."""
    monkeypatch.setattr(merge_triton, "GRAM_PARTIAL_ENTRIES", 100)
    out_dtype = DTYPES[(DTYPES.index(dtype) + 1) % len(DTYPES)]
    base, inputs = make_case("random", shape, 3, dtype, seed=9)
    out, counts = merge_triton.model_stock_rows(base.reshape(-1), [x.reshape(-1) for x in inputs], shape[1],
                                                out_dtype)
    assert counts == [0, 0, 0, 0] and out.dtype == out_dtype and out.shape == (base.numel(),)
    expected = model_stock_reference(base.cpu(), [x.cpu() for x in inputs], filter_wise=True).to(out_dtype)
    assert_merge_close(out.cpu().reshape(shape), expected)


def test_tensors_on_the_wrong_device_are_refused():
    wrong = torch.zeros(4, device="meta" if merge_gta.interpreted() else "cpu")
    with pytest.raises(moefuse.MergeInputError, match="Triton backend"):
        merge_triton.count_nonfinite([wrong])
