"""Rank selection with bands (moefuse.ops.select): the CPU kernel's banded histograms count
exactly, and thresholds equal the reference's rank order whether the bands guessed from the
tensor's prefix hold the ranks or not (then every bin is counted again)."""

from __future__ import annotations

import pytest
import torch

from moefuse.ops import backends, select
from moefuse.ops.merge_reference import magnitude_keys, rank_order
from moefuse.ops.pieces import Pieces
from moefuse.ops.plan import KEEP_RANKS, GtaPlan, KeepRule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BINS = select.LEVEL1_BINS


@pytest.fixture
def merge_cpu():
    if not backends.available("cpu"):
        pytest.fail(f"C++ extension missing: {backends.cpu_unavailable_reason()}")
    from moefuse.ops import merge_cpu

    return merge_cpu


def _bins(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return magnitude_keys(x - base) >> select.level1_shift(base.dtype)


def _expected_banded(bins: torch.Tensor, bands) -> torch.Tensor:
    """bincount inside the bands; below the first band in its bin lo - 1; between a band and the
    next (or above the last) in the band's bin hi + 1; nothing elsewhere."""
    everything = torch.bincount(bins, minlength=BINS)
    expected = torch.zeros(BINS, dtype=torch.int64)
    for t, (lo, hi) in enumerate(bands):
        expected[lo:hi + 1] = everything[lo:hi + 1]
        if t == 0 and lo > 0:
            expected[lo - 1] = (bins < lo).sum()
        upper = bands[t + 1][0] if t + 1 < len(bands) else BINS
        if hi + 1 < BINS:
            expected[hi + 1] = ((bins > hi) & (bins < upper)).sum()
    return expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 17, 5003])
def test_banded_histogram_counts_the_bands_and_the_lumps(merge_cpu, dtype, n):
    """Inside the bands: the counts of every bin; the lumps below, between and above them; nothing
    elsewhere. Sizes exercise the 16-wide vector loop and its scalar tail."""
    generator = torch.Generator().manual_seed(n)
    base, x, y = [torch.randn(n, generator=generator).to(dtype) for _ in range(3)]
    bins = [_bins(base, x), _bins(base, y)]
    middle = int(bins[0].median())
    cases = [((0, 5),), ((BINS - 8, BINS - 1),), ((middle, middle),), ((middle - 40, middle + 3),),
             ((0, 0), (middle, middle + 2)),  # two bands, the first at bin 0
             ((middle - 300, middle - 2), (middle, middle), (BINS - 3, BINS - 1)),  # one bin between two
             ((middle - 9, middle - 5), (middle + 30, middle + 31))]
    range_size = 1000
    for bands in cases:
        hist = merge_cpu.histogram_level1(base, [x, y], [0, 1], range_size, bands=[bands, select.EVERY_BIN])
        assert hist.shape == (2, -(-n // range_size), BINS)
        for r in range(hist.shape[1]):
            part = slice(r * range_size, (r + 1) * range_size)
            assert torch.equal(hist[0, r].long(), _expected_banded(bins[0][part], bands)), bands
            assert torch.equal(hist[1, r].long(), torch.bincount(bins[1][part], minlength=BINS))


@pytest.mark.parametrize("bands, message", [
    ([[(3, 2)]], "0 <= lo <= hi"),
    ([[(0, BINS)]], "0 <= lo <= hi"),
    ([[(-1, 5)]], "0 <= lo <= hi"),
    ([[(0, 5)], [(0, 5)]], "bands of every input"),
    ([[]], "at least one"),
    ([[(10, 20), (21, 30)]], "at least one bin between"),  # no bin left for the lump between
    ([[(10, 20), (5, 8)]], "ascend"),
])
def test_bad_bands_are_refused(merge_cpu, bands, message):
    base = torch.zeros(10)
    with pytest.raises(RuntimeError, match=message):
        merge_cpu.histogram_level1(base, [base], [0], 16, bands=bands)


def test_bands_wider_than_the_share_limit_count_every_bin():
    """Per model: narrow bands around its ranks, or EVERY_BIN where they would hold more than
    MAX_BAND_SHARE of the prefix; None where no model has narrow bands."""
    counts = torch.zeros(2, BINS, dtype=torch.int64)
    counts[:, 1000:2000] = 100  # 100000 keys spread evenly over 1000 bins
    n = 1_000_000
    narrow = {0: [n // 2], 1: [n * k // 50 for k in range(1, 50)]}  # model 1: a rank every 2%
    bands = select._bands(counts, narrow, [0, 1], n)
    (lo, hi), = bands[0]
    assert 1000 < lo < 1500 < hi < 2000 and hi - lo < 100, bands[0]
    assert bands[1] == select.EVERY_BIN
    assert select._bands(counts, {0: narrow[1], 1: narrow[1]}, [0, 1], n) is None


def test_rank_bands_are_joined_where_they_touch():
    assert select._joined([(50, 60), (5, 9), (10, 20), (58, 70), (72, 80)]) == ((5, 20), (50, 70), (72, 80))


@pytest.mark.parametrize("n", [1, 17, 5003])
def test_level2_histogram_counts_the_low_bits_of_one_prefix(merge_cpu, n):
    generator = torch.Generator().manual_seed(n)
    base, x, y = [torch.randn(n, generator=generator) for _ in range(3)]
    keys = [magnitude_keys(x - base), magnitude_keys(y - base)]
    prefixes = [int(keys[0][n // 2] >> 16), 0x7F80]  # a prefix present, and Inf's (absent)
    hist = merge_cpu.histogram_level2(base, [x, y], [0, 1], prefixes)
    for row, (key, prefix) in enumerate(zip(keys, prefixes)):
        inside = key[(key >> 16) == prefix]
        assert torch.equal(hist[row], torch.bincount(inside & 0xFFFF, minlength=select.LEVEL2_BINS))
    with pytest.raises(RuntimeError, match="prefixes are level-1 bins"):
        merge_cpu.histogram_level2(base, [x], [0], [BINS])


def _case(kind: str, n: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(n, generator=generator)
    if kind == "quantized":  # many magnitudes tied at every cut
        inputs = [base + 0.01 * torch.randint(-4, 5, (n,), generator=generator) for _ in range(3)]
    elif kind == "mostly zero":  # frozen weights: the cuts fall on magnitude 0 or just above
        inputs = [base + (torch.rand(n, generator=generator) < 0.2) * torch.randn(n, generator=generator)
                  for _ in range(3)]
    else:
        inputs = [base + scale * torch.randn(n, generator=generator) for scale in (0.001, 0.01, 0.1)]
    return base.to(dtype), [x.to(dtype) for x in inputs]


def _misleading_prefix(base: torch.Tensor, inputs, prefix: int):
    """Huge deltas in the prefix the bands are guessed from: the bands sit far above the ranks."""
    generator = torch.Generator().manual_seed(8)
    shift = 1000 * (1 + torch.rand(prefix, generator=generator))
    return base, [torch.cat([x[:prefix] + shift.to(x.dtype), x[prefix:]]) for x in inputs]


def _assert_exact(base, inputs, thresholds):
    n = base.numel()
    index = torch.arange(n)
    for (i, rank), threshold in thresholds.items():
        keys = magnitude_keys(inputs[i] - base)
        inside = (keys > threshold.key) | ((keys == threshold.key) & (index < threshold.cut))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[rank_order(inputs[i] - base)[:rank]] = True
        if threshold.key == 0:  # which zero deltas count as kept does not matter (select.py)
            inside, expected = inside[keys != 0], expected[keys != 0]
        assert torch.equal(inside, expected), (i, rank, threshold)


@pytest.mark.parametrize("piece", [None, 1024, 16384], ids=["whole", "pieces", "larger pieces"])
@pytest.mark.parametrize("kind", ["random", "quantized", "mostly zero", "misleading prefix"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_banded_selection_gives_exact_thresholds(merge_cpu, dtype, kind, piece, monkeypatch):
    """Ranges of 4096 entries: the first one is counted in every bin, the rest in bands; pieces
    of 1024 end there, pieces of 16384 (and the whole tensor) are cut there."""
    monkeypatch.setattr(select, "SAMPLE_MIN_ENTRIES", 1 << 12)
    monkeypatch.setattr(select, "TIE_CHUNK", 64)
    monkeypatch.setattr(select, "MIN_RANGE", 1024)
    n = 40_000
    base, inputs = _case("random" if kind == "misleading prefix" else kind, n, dtype)
    if kind == "misleading prefix":
        base, inputs = _misleading_prefix(base, inputs, 4096)
    passes = []
    histogram = merge_cpu.histogram_level1

    def spy(base, inputs, models, range_size, bands=None):
        passes.append((base.numel(), bands))
        return histogram(base, inputs, models, range_size, bands=bands)

    monkeypatch.setattr(merge_cpu, "histogram_level1", spy)
    # model 3 keeps the ranks between 1% and 35% (breadcrumbs): two bands, far apart
    ranks = [(0, 1), (0, n // 10), (0, n // 2), (n // 100, n * 35 // 100)]
    plan = GtaPlan(tuple(KeepRule(KEEP_RANKS, rank_lo=lo, rank_hi=hi) for lo, hi in ranks), (1.0,) * 4,
                   consensus=False, normalize=False, lam=1.0, rescale=None, seed=0)
    inputs = inputs + [inputs[2]]
    pieces = Pieces.streaming(n, piece) if piece else Pieces.whole(n)
    thresholds = select.rank_thresholds(merge_cpu, base, inputs, plan, pieces)
    _assert_exact(base, inputs, thresholds)
    offset, first_pass = 0, 0
    while offset < n:  # the first pass: the prefix in every bin, then bands
        entries, bands = passes[first_pass]
        assert (bands is None) == (offset < 4096), (offset, bands)
        offset, first_pass = offset + entries, first_pass + 1
    if kind == "random":
        assert len(passes[first_pass - 1][1][3]) == 2, passes[first_pass - 1][1]
    again = passes[first_pass:]
    if kind == "misleading prefix":  # a rank outside its band: every bin counted again
        assert sum(entries for entries, _ in again) == n and all(bands is None for _, bands in again)
    else:
        assert again == [], "the guessed bands should have held every rank"


def test_small_tensors_and_other_backends_count_every_bin(merge_cpu, monkeypatch):
    """Below SAMPLE_MIN_ENTRIES, or with a backend that has no bands, there is no band pass."""
    range_size = select.level1_range_size(5000)
    assert select._band_start(merge_cpu, 5000, range_size) is None
    monkeypatch.setattr(select, "SAMPLE_MIN_ENTRIES", 1 << 10)
    monkeypatch.setattr(select, "MIN_RANGE", 256)
    range_size = select.level1_range_size(5000)
    assert select._band_start(merge_cpu, 5000, range_size) == range_size

    class NoBands:
        pass

    assert select._band_start(NoBands, 5000, range_size) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nth_key_index_finds_the_tied_entry_in_index_order(merge_cpu, dtype):
    """Quantized deltas: many entries share each key; tiles of 1024 entries are crossed."""
    generator = torch.Generator().manual_seed(3)
    n = 5003
    base = torch.randn(n, generator=generator).to(dtype)
    x = (base.float() + 0.01 * torch.randint(-3, 4, (n,), generator=generator)).to(dtype)
    keys = magnitude_keys(x - base)
    key = int(keys[n // 2])
    positions = torch.nonzero(keys == key).reshape(-1)
    total = positions.numel()
    for left in sorted({0, 1, total // 2, total - 1}):
        assert merge_cpu.nth_key_index(base, x, key, left) == (int(positions[left]), left + 1)
    assert merge_cpu.nth_key_index(base, x, key, total) == (-1, total)
    absent = int(keys.max()) + 1
    assert merge_cpu.nth_key_index(base, x, absent, 0) == (-1, 0)
    assert merge_cpu.nth_key_index(base[:0], x[:0], key, 0) == (-1, 0)
