"""moefuse's merge methods against mergekit 0.1.5's own method code, on random tensors.

fp32 must agree to 1e-6 relative. For bf16/fp16, mergekit computes in the input dtype (each
step rounded) and moefuse in fp32, so moefuse is compared with mergekit run on the same inputs
upcast to fp32 (its semantics without its rounding): within 2 ulp of the operands' scale; and
with mergekit's native 16-bit run, where at least 99% of the entries must agree that closely.
Excluded and counted: entries whose magnitude ties straddle a trim threshold (mergekit breaks
such ties arbitrarily, moefuse by flat index) and, for sign election in 16-bit dtypes, entries
whose sign sum is within rounding of zero. For DARE/DELLA, mergekit's Bernoulli draws are
replaced by moefuse's counter-based masks so the rest compares exactly.
"""

from __future__ import annotations

import pytest
import torch

import moefuse
from moefuse.methods import get_method, resolve_params
from moefuse.ops.merge_reference import keep_mask, magnitude_keys
from moefuse.ops.plan import KEEP_RANKS, gta_plan, l1_rescale
from tests.helpers import assert_merge_close, operand_scale, require_peer, ulp
from tests.mergekit_peer import mergekit_merge

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (37,), (64, 48), (3, 11, 29)]

GTA_CASES = {
    "task_arithmetic": dict(weight=[1.0, 0.5, -0.3], **{"lambda": 0.8}),
    "ties": dict(weight=[1.0, 0.6, 0.8], density=[0.3, 0.5, 0.7]),
    "ties_no_normalize": dict(weight=[1.0, 0.6, 0.8], density=0.4, normalize=False, **{"lambda": 1.3}),
    "ties_rescale": dict(weight=[0.4, 0.6, 0.8], density=0.3, rescale=True),
    "dare_ties": dict(weight=[1.0, 0.5, 0.7], density=[0.4, 0.6, 0.2], seed=3),
    "dare_linear": dict(weight=[0.3, 0.3, 0.4], density=0.5, seed=11),
    "breadcrumbs": dict(weight=[1.0, 0.5, 0.7], density=0.6, gamma=0.05),
    "breadcrumbs_ties": dict(weight=[1.0, 0.5, 0.7], density=0.6, gamma=0.1),
    "della": dict(weight=[1.0, 0.5, 0.7], density=0.5, epsilon=0.2, seed=5),
    "della_linear": dict(weight=[1.0, 0.5, 0.7], density=0.4, epsilon=0.1, seed=6),
}


def _method(case: str) -> str:
    return case.split("_no_")[0].replace("_rescale", "")


def _inputs(shape, dtype, n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator).to(dtype)
    tensors = [(base.float() + 0.05 * torch.randn(shape, generator=generator)).to(dtype) for _ in range(n)]
    return base, tensors


def _plan_and_masks(method, base, tensors, params):
    spec = get_method(method)
    resolved = resolve_params(spec, len(tensors), params)
    plan = gta_plan(spec, resolved, base.numel())
    deltas = [(x - base).float() for x in tensors]
    masks = [keep_mask(d, rule, plan.seed, i) for i, (d, rule) in enumerate(zip(deltas, plan.rules))]
    return plan, deltas, masks


def _straddling_ties(plan, deltas) -> torch.Tensor:
    """Entries whose magnitude equals a key that appears on both sides of a rank cut."""
    excluded = torch.zeros(deltas[0].numel(), dtype=torch.bool)
    for rule, delta in zip(plan.rules, deltas):
        if rule.kind != KEEP_RANKS:
            continue
        keys = magnitude_keys(delta)
        ordered = torch.sort(keys, descending=True).values
        for cut in (rule.rank_lo, rule.rank_hi):
            if 0 < cut < keys.numel() and ordered[cut - 1] == ordered[cut]:
                excluded |= keys == ordered[cut]
    return excluded


def _ambiguous_signs(plan, deltas, masks, dtype) -> torch.Tensor:
    """Entries where the TIES sign sum is within 16-bit rounding of zero."""
    if not plan.consensus or dtype == torch.float32:
        return torch.zeros(deltas[0].numel(), dtype=torch.bool)
    scales = plan.static_scales() or [
        l1_rescale(d.double().abs().sum().item(), (d.double().abs() * m).sum().item()) if r.sparse else 1.0
        for d, m, r in zip(deltas, masks, plan.rules)
    ]
    contributions = torch.stack(
        [w * s * d * m for w, s, d, m in zip(plan.weights, scales, deltas, masks)]
    ).reshape(len(deltas), -1)
    largest = contributions.abs().amax(dim=0)
    return (contributions.sum(dim=0).double().abs() <= 4 * len(deltas) * ulp(largest, dtype)) & (largest > 0)


def _gta_case(case, shape, dtype):
    require_peer("mergekit")
    method, params = _method(case), GTA_CASES[case]
    if get_method(method).sparsifier == "della" and len(shape) == 1 and shape[0] == 1:
        pytest.skip("mergekit's DELLA divides by zero on rows of length 1")
    base, tensors = _inputs(shape, dtype)
    plan, deltas, masks = _plan_and_masks(method, base, tensors, params)
    random_sparsifier = get_method(method).sparsifier in ("random", "della")

    def run_mergekit(upcast: bool) -> torch.Tensor:
        inputs = [t.float() if upcast else t for t in (base, *tensors)]
        return mergekit_merge(
            method, inputs[0], inputs[1:], masks=masks if random_sparsifier else None,
            **{k: v for k, v in params.items() if k != "seed"},
        ).to(dtype)

    actual = moefuse.merge_tensors(base, tensors, method, **params)
    excluded = _straddling_ties(plan, deltas) | _ambiguous_signs(plan, deltas, masks, dtype)
    assert excluded.float().mean() < 0.5, "too many ambiguous entries to compare"
    return base, tensors, actual, excluded, run_mergekit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", sorted(GTA_CASES))
def test_gta_family_matches_mergekit_semantics(case, shape, dtype):
    base, tensors, actual, excluded, run_mergekit = _gta_case(case, shape, dtype)
    expected = run_mergekit(upcast=dtype != torch.float32)
    assert_merge_close(actual, expected, exclude=excluded, ulps=2, scale=operand_scale(base, *tensors))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", sorted(GTA_CASES))
def test_gta_family_close_to_mergekit_native_16bit(case, dtype):
    base, tensors, actual, excluded, run_mergekit = _gta_case(case, (64, 48), dtype)
    expected = run_mergekit(upcast=False)
    scale = operand_scale(base, *tensors).reshape(-1)
    difference = (actual.double() - expected.double()).abs().reshape(-1)
    close = (difference <= 2 * ulp(scale, dtype)) | excluded
    assert close.float().mean() >= 0.99, f"{int((~close).sum())} of {close.numel()} entries beyond 2 ulp"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "method,params",
    [
        ("linear", dict(weight=[1.0, 2.0, 0.5])),
        ("linear", dict(weight=[0.2, 0.3, 0.1], normalize=False)),
        ("slerp", dict(t=0.3)),
        ("slerp", dict(t=0.9)),
        ("model_stock", {}),
        ("model_stock", dict(filter_wise=True)),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_interpolation_methods_match_mergekit(method, params, shape, dtype):
    require_peer("mergekit")
    base, tensors = _inputs(shape, dtype)
    if method == "slerp":
        tensors = tensors[:1]
    if method == "model_stock" and shape == (1,):
        pytest.skip("one entry has no angle between task vectors")
    moefuse_base = None if method == "linear" else base
    upcast = [t.float() for t in tensors]  # mergekit's semantics without its 16-bit rounding
    expected = mergekit_merge(method, None if moefuse_base is None else base.float(), upcast, **params)
    actual = moefuse.merge_tensors(moefuse_base, tensors, method, **params)
    expected = expected.to(dtype)
    assert_merge_close(actual, expected, ulps=2, scale=operand_scale(base, *tensors))


def test_slerp_collinear_inputs_fall_back_to_lerp():
    require_peer("mergekit")
    base = torch.randn(100)
    other = base * 2.0
    expected = mergekit_merge("slerp", base, [other], t=0.25)
    actual = moefuse.merge_tensors(base, [other], "slerp", t=0.25)
    assert_merge_close(actual, expected)
    assert_merge_close(actual, base * 1.25)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "method,params,with_base",
    [
        ("nuslerp", dict(weight=[0.3, 0.8]), True),
        ("nuslerp", dict(weight=[0.5, -0.5]), True),  # |w_0 + w_1| < 1e-6: t = 0.5
        ("nuslerp", dict(weight=[0.3, 0.8]), False),
        ("nuslerp", dict(weight=[0.6, 0.2], nuslerp_flatten=False), True),
        ("nuslerp", dict(weight=[0.6, 0.2], nuslerp_flatten=False, nuslerp_row_wise=True), False),
        ("multislerp", dict(weight=[0.2, 0.5, 0.9]), True),
        ("multislerp", dict(weight=[0.2, 0.5, 0.9], normalize_weights=False), False),
        ("karcher", {}, False),
        ("karcher", dict(max_iter=2, tol=1e-3), False),
        ("nearswap", dict(t=0.03), True),
        ("sce", {}, True),
        ("sce", dict(select_topk=0.4), True),
        ("sce", dict(select_topk=0.0), True),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_group_methods_match_mergekit(method, params, with_base, shape, dtype):
    """nuslerp, multislerp, karcher, nearswap and SCE against mergekit run on the fp32-upcast inputs
    (karcher takes the base as one more input)."""
    require_peer("mergekit")
    base, tensors = _inputs(shape, dtype)
    tensors = tensors[:{"nuslerp": 2, "nearswap": 1}.get(method, 3)]
    if method == "karcher":
        base, tensors = None, [base, *tensors]
    elif not with_base:
        base = None
    operands = ([base] if base is not None else []) + tensors
    expected = mergekit_merge(method, base.float() if base is not None else None, [t.float() for t in tensors],
                              **params)
    actual = moefuse.merge_tensors(base, tensors, method, **params)
    excluded = _variance_ties_at_cut(base, tensors, params["select_topk"]) if 0 < params.get("select_topk", 1) < 1 \
        else None
    assert_merge_close(actual, expected.to(dtype), ulps=2, scale=operand_scale(*operands), exclude=excluded)


def _variance_ties_at_cut(base, tensors, select_topk):
    """Entries whose variance equals the k-th largest: mergekit's topk keeps an arbitrary few of
    them, moefuse the lowest indices."""
    deltas = torch.stack([t.float() - base.float() for t in tensors]).reshape(len(tensors), -1)
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.tensor(int((variance != 0).sum())) * select_topk)
    if k == 0:
        return None
    threshold = torch.sort(variance, descending=True).values[k - 1]
    ties = variance == threshold
    return ties if int(ties.sum()) > 1 else None


def test_nuslerp_antipodal_single_entries_interpolate_linearly():
    """Task vectors of one entry with opposite signs: mergekit's cosine is exactly -1, so it falls
    back to linear interpolation; so does moefuse whatever its Gram sums round to."""
    require_peer("mergekit")
    base = torch.tensor([1.6504])
    tensors = [base - 0.0977, base + 0.0115]
    expected = mergekit_merge("nuslerp", base, tensors, weight=[0.3, 0.7])
    for backend in ("cpu", "reference"):
        actual = moefuse.merge_tensors(base, tensors, "nuslerp", weight=[0.3, 0.7], backend=backend)
        assert_merge_close(actual, expected)
