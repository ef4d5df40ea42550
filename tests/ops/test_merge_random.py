"""DARE and DELLA: keep rates, rescaling, unbiasedness, and exact reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moefuse
from moefuse.ops import backends
from tests.helpers import DEVICE

N = 200_000


def _kept(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return (out.float() - base.float()) != 0


def _ones_delta(n=N, dtype=torch.float32):
    base = torch.zeros(n, dtype=dtype)
    return base, [torch.ones(n, dtype=dtype), torch.full((n,), 2.0, dtype=dtype)]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keep_rate(density):
    base, tensors = _ones_delta()
    out = moefuse.merge_tensors(base, tensors[:1], "dare_linear", density=density, rescale=False, seed=7)
    rate = _kept(out, base).float().mean().item()
    sigma = math.sqrt(density * (1 - density) / N)
    assert abs(rate - density) < 5 * sigma, (rate, density)


def test_dare_inverse_density_rescale_is_unbiased():
    base, tensors = _ones_delta()
    out = moefuse.merge_tensors(
        base, tensors[:1], "dare_linear", density=0.3, rescale_mode="inverse_density", seed=1
    )
    kept_values = out[_kept(out, base)]
    assert torch.allclose(kept_values, torch.full_like(kept_values, 1 / 0.3))
    mean = out.mean().item()  # E[mask / p] = 1
    sigma = math.sqrt((1 - 0.3) / 0.3 / N)
    assert abs(mean - 1.0) < 5 * sigma


def test_dare_l1_rescale_preserves_the_norm():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=generator)
    model = base + torch.randn(N, generator=generator)
    out = moefuse.merge_tensors(base, [model], "dare_linear", density=0.25, seed=3)
    before = (model - base).abs().double().sum()
    after = (out - base).abs().double().sum()
    assert abs(after / before - 1) < 1e-5


def test_dare_is_reproducible_and_seed_dependent():
    base, tensors = _ones_delta(5000)
    run = lambda seed: moefuse.merge_tensors(base, tensors, "dare_ties", density=0.5, seed=seed)
    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_models_draw_independent_masks():
    base, tensors = _ones_delta(5000)
    first = moefuse.merge_tensors(base, tensors[:1], "dare_linear", density=0.5, rescale=False, seed=9)
    second = moefuse.merge_tensors(
        base, [tensors[0], tensors[0]], "dare_linear", weight=[0.0, 1.0], density=0.5, rescale=False, seed=9
    )
    agreement = (_kept(first, base) == _kept(second, base)).float().mean().item()
    assert 0.45 < agreement < 0.55  # independent masks agree about half the time


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks_do_not_depend_on_backend_or_tiling(dtype):
    """The reference draws the whole tensor at once, the CPU backend in tiles, Triton in blocks:
    the same seed gives the same mask everywhere."""
    base, tensors = _ones_delta(3001, dtype)
    params = dict(density=[0.3, 0.6], seed=2**40 + 17, rescale=False)
    expected = moefuse.merge_tensors(base, tensors, "dare_linear", backend="reference", **params)
    names = ["cpu"] + (["triton"] if backends.available("triton") else [])
    for name in names:
        device = "cpu" if name == "cpu" else DEVICE
        actual = moefuse.merge_tensors(
            base.to(device), [t.to(device) for t in tensors], "dare_linear", backend=name, **params
        )
        assert torch.equal(actual.cpu(), expected), name


def test_della_keeps_large_magnitudes_more_often():
    generator = torch.Generator().manual_seed(0)
    rows, cols = 400, 500
    base = torch.zeros(rows, cols)
    model = torch.randn(rows, cols, generator=generator)
    out = moefuse.merge_tensors(base, [model], "della_linear", density=0.5, epsilon=0.2, rescale=False, seed=1)
    kept = _kept(out, base)
    large = model.abs() >= model.abs().median(dim=1, keepdim=True).values
    rate_large, rate_small = kept[large].float().mean().item(), kept[~large].float().mean().item()
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    assert abs(rate_large - 0.6) < 0.01 and abs(rate_small - 0.4) < 0.01, (rate_large, rate_small)


def _fast_backend(name: str):
    """(backend module, device of its tensors) for "cpu" or "triton"; skips where unavailable."""
    if not backends.available(name):
        pytest.skip(f"{name} backend unavailable")
    if name == "cpu":
        return backends.cpu_backend(warn_if_missing=False), "cpu"
    return backends.triton_backend(), DEVICE


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# Rows of up to 2^16 entries of a 16-bit dtype are sorted as 32-bit words, longer rows as 64-bit ones.
@pytest.mark.parametrize("shape, offset", [((6, 4099), 0), ((3, 1000), 2**34 - 1500), ((5, 1), 17), ((1, 1), 0),
                                           ((1, 70001), 3), ((203, 37), 5), ((70, 12), 0)], ids=lambda c: str(c))
def test_della_keep_kernel_equals_the_reference_mask(backend, dtype, shape, offset):
    """Rows longer and shorter than a tile, many tied magnitudes (ranks by position), a row of
    one, flat indices across 2^34 (Philox's high counter word: blocks of 4), and many rows that do not end on
    a byte of the packed mask (the CPU threads split them in groups that do)."""
    from moefuse.ops.merge_reference import della_rank_probabilities, keep_mask
    from moefuse.ops.plan import KEEP_DELLA, KeepRule

    generator = torch.Generator().manual_seed(shape[1])
    base = torch.randn(shape, generator=generator).to(dtype)
    model = (base.float() + 0.01 * torch.randint(-3, 4, shape, generator=generator)).to(dtype)
    rule = KeepRule(KEEP_DELLA, density=0.4, epsilon=0.15)
    expected = keep_mask((model - base).float(), rule, 9, 2, offset)
    probability = della_rank_probabilities(shape[1], rule.density, rule.epsilon)
    impl, device = _fast_backend(backend)
    packed = impl.della_keep(base.to(device), model.to(device), probability, 9, 2, offset).cpu()
    n = base.numel()
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    bits = torch.from_numpy(np.unpackbits(packed.numpy(), bitorder="little"))
    assert torch.equal(bits[:n].bool().reshape(shape), expected)
    assert not bits[n:].any()  # the last byte's unused bits stay 0


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_draws_past_the_high_counter_word(backend):
    """Flat offsets past 2^34 (Philox's high counter word is (j >> 2) >> 32): the fused pass keeps
    exactly the entries whose reference draw is below the threshold."""
    from moefuse.methods import get_method, resolve_params
    from moefuse.ops.gta_pipeline import encode_rules
    from moefuse.ops.philox import philox_uint32
    from moefuse.ops.plan import gta_plan

    impl, device = _fast_backend(backend)
    n, offset = 3000, 2**34 - 1234  # counters 2^32 - 309 .. 2^32 + 441: both high words
    spec = get_method("dare_linear")
    plan = gta_plan(spec, resolve_params(spec, 1, {"density": 0.5, "seed": 3, "rescale": False}), n)
    base, ones = torch.zeros(n, device=device), torch.ones(n, device=device)
    out, _ = impl.fused_gta(base, [ones], encode_rules(plan, {}), plan.seed, [1.0], [1.0], False, False, 1.0, 1.0,
                            torch.float32, offset)
    expected = philox_uint32(plan.seed, 0, torch.arange(offset, offset + n)) < plan.rules[0].threshold32
    assert torch.equal(out.cpu(), expected.float())


def test_draws_are_random123_philox_words():
    """Entries 0-3 of stream 0 under seed 0 are the four words of Philox-4x32-10 with counter 0
    and key 0 (Random123's known-answer vector); entries 4-7 come from counter 1."""
    from moefuse.ops.philox import philox_uint32

    words = philox_uint32(0, 0, torch.arange(8)).tolist()
    assert words[:4] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words[4:] != words[:4]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("n", [1, 1023, 5000], ids=lambda n: f"n{n}")
def test_dare_keep_decisions_are_recorded_once_and_replayed(backend, n):
    """The L1 pass records each Philox keep decision as a bit; the fused pass replays the bits
    instead of drawing: the recorded bits are the draws, and the fused pass follows them."""
    from moefuse.methods import get_method, resolve_params
    from moefuse.ops.gta_pipeline import ALWAYS, RANDOM_THRESHOLD, encode_rules
    from moefuse.ops.philox import philox_uint32
    from moefuse.ops.plan import gta_plan

    impl, device = _fast_backend(backend)
    generator = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=generator).to(torch.bfloat16)
    inputs = [(base.float() + 0.1 * torch.randn(n, generator=generator)).to(device, torch.bfloat16) for _ in range(2)]
    base = base.to(device)
    spec = get_method("dare_ties")
    plan = gta_plan(spec, resolve_params(spec, 2, {"density": 0.3, "weight": [0.6, 0.4], "seed": 5}), n)
    rules, offset = encode_rules(plan, {}), 12345
    # Each buffer is followed by guard bytes, which recording must leave alone.
    buffers = [torch.full(((n + 7) // 8 + 16,), 0xAA, dtype=torch.uint8, device=device) for _ in inputs]
    bits = [buffer[:(n + 7) // 8] for buffer in buffers]
    impl.l1_norms(base, inputs, rules, plan.seed, offset, random_keeps=bits)
    assert all((buffer[(n + 7) // 8:] == 0xAA).all() for buffer in buffers)
    positions = torch.arange(n)
    for i, recorded in enumerate(bits):
        unpacked = (recorded.cpu()[positions // 8].long() >> (positions % 8)) & 1
        drawn = philox_uint32(plan.seed, i, torch.arange(offset, offset + n)) < plan.rules[i].threshold32
        assert torch.equal(unpacked.bool(), drawn)

    def fused(rules, **keeps):
        return impl.fused_gta(base, inputs, rules, plan.seed, [0.6, 0.4], [0.6, 0.4], True, True, 1.0, 1.0,
                              torch.float32, offset, **keeps)[0]

    assert torch.equal(fused(rules, random_keeps=bits), fused(rules))
    keep_everything = rules.clone()
    keep_everything[:, RANDOM_THRESHOLD] = ALWAYS
    assert torch.equal(fused(rules, random_keeps=[torch.full_like(b, 255) for b in bits]), fused(keep_everything))
    with_replayed_norms = impl.l1_norms(base, inputs, rules, plan.seed, offset,
                                        random_keeps=[torch.zeros_like(b) for b in bits], replay=True)
    assert torch.equal(with_replayed_norms[1], torch.zeros(2, dtype=torch.float64))  # nothing kept
