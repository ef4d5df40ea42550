"""Rank thresholds by histogram selection (no sorting), shared by the fast backends.

Magnitude keys are the IEEE bit patterns of |d| in d's dtype (see `magnitude_keys`), which
order like |d|. The entry of descending rank r (ties by increasing flat index) is found with:

1. a histogram of `key >> LEVEL1_SHIFT` (32768 bins; exact for 16-bit dtypes). Where the
   backend can count bands of bins only (HISTOGRAM_BANDS), the first SAMPLE_SHARE of the
   entries are counted in every bin; from them, each rank gets the band of bins it very likely
   falls in (a model's bands are joined where they touch; breadcrumbs' two far-apart ranks keep
   two), and the rest of the pass counts those bins one by one and the others in lumps between
   the bands, about twice as fast on the CPU, in the same sequential read. A rank that falls
   outside its bands (a prefix unlike the rest) is located again with every bin counted, so the
   result never depends on the guess.
2. for fp32, a histogram of the low 16 bits inside the chosen level-1 bin,
3. when the threshold key is shared by several entries, the counts of that key per level-1 range
   (16-bit dtypes) or per chunk, then a scan of one range or chunk (`nth_key_index` where the
   backend has it), to find the flat index where the r-th entry sits.

Every pass walks the inputs in `Pieces` (moefuse.ops.pieces): histograms add up over pieces, and
per-range level-1 histograms come from the backend (one piece) or from groups of pieces.

The result is a `Threshold(key, cut)`: an entry is among the top r iff
`key_e > key or (key_e == key and index_e < cut)`. Backends supply three kernels, and optionally
a fourth:

    histogram_level1(base, inputs, models, range_size[, bands]) -> int64 [len(models), 32768], or
        counts per range [len(models), ceil(n / range_size), 32768] (range r: flat entries
        [r range_size, (r + 1) range_size)), which also locate ties for 16-bit dtypes; `bands`
        (with HISTOGRAM_BANDS = True): per model its bands (lo, hi), ascending with at least
        one bin between two; keys below the first band are counted in its bin lo - 1, keys
        between a band and the next (or above the last) in the band's bin hi + 1
    histogram_level2(base, inputs, models, prefixes) -> int64 [len(models), 65536]
        (low 16 bits of keys whose high bits equal the prefix; fp32 only)
    chunk_counts(base, inputs, models, keys, chunk) -> int64 [len(models), ceil(n / chunk)]
        (entries whose key equals the given key, per chunk of `chunk` flat entries)
    nth_key_index(base, x, key, left) -> (flat index of the left-th entry whose key equals key,
        or -1; the number of such entries counted)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from moefuse.ops.merge_reference import magnitude_keys
from moefuse.ops.pieces import TIE_CHUNK, Pieces
from moefuse.ops.plan import KEEP_RANKS, GtaPlan

LEVEL1_BINS = 1 << 15
LEVEL2_BINS = 1 << 16
MAX_RANGES = 16
MIN_RANGE = 1 << 20  # entries per range: keeps the per-range histograms small next to the tensor
SAMPLE_MIN_ENTRIES = 1 << 22  # smaller tensors count every bin (their histograms are cheap)
SAMPLE_SHARE = 1 / 16  # the prefix counted in every bin, rounded up to whole level-1 ranges
SAMPLE_SIGMAS = 6.0  # band margin around a rank's estimate, in standard deviations of its count,
SAMPLE_SLACK = 0.01  # plus this share of the prefix (a prefix is no random sample)
# Bands holding more of the prefix than this count every bin instead: on the 2-core AMD EPYC, 3 x 16M
# entries, one thread, bands holding 44% / 63% / 91% of the keys cost 0.62 / 0.79 / 0.98 ns per
# entry in bf16 (0.70 / 0.90 / 1.15 in fp32 at 40% / 60% / 90%), every bin 0.91 (fp32 1.06).
MAX_BAND_SHARE = 0.5
NOTHING_KEY = 1 << 32  # larger than every key: no entry is inside
EVERYTHING_KEY = -1  # smaller than every key: every entry is inside


@dataclass(frozen=True)
class Threshold:
    key: int
    cut: int


NOTHING = Threshold(NOTHING_KEY, 0)
EVERYTHING = Threshold(EVERYTHING_KEY, 0)


def level1_range_size(n: int) -> int:
    """Entries per level-1 range: a power of two of at least MIN_RANGE, with at most MAX_RANGES
    ranges; powers of two tile with the pieces (`Pieces.streaming`)."""
    size = 1 << max(0, MIN_RANGE - 1).bit_length()
    while size * MAX_RANGES < n:
        size *= 2
    return size


def level1_shift(dtype: torch.dtype) -> int:
    return 16 if dtype == torch.float32 else 0


def _locate(histogram: torch.Tensor, rank: int) -> Tuple[int, int]:
    """Bin holding descending rank `rank` and the number of entries in higher bins."""
    counts = histogram.numpy()
    from_top = np.cumsum(counts[::-1])  # from_top[k]: entries in the top k + 1 bins
    k = int(np.searchsorted(from_top, rank, side="right"))
    b = len(counts) - 1 - k
    return b, int(from_top[k] - counts[b])


class RangeCounts:
    """Per-range level-1 histograms, kept as the backend returned them piece by piece (no copy
    into one tensor): `counts(row, key)` gathers one key's count in every range."""

    def __init__(self, ranges: int):
        self.ranges = ranges
        self.parts: List[Tuple[int, torch.Tensor]] = []  # (first range, int32 [models, k, bins])

    def add(self, first: int, hist: torch.Tensor) -> None:
        self.parts.append((first, hist))

    def counts(self, row: int, key: int) -> torch.Tensor:
        """int64 [ranges]: entries of model row `row` whose key is `key`, per range."""
        counts = torch.zeros(self.ranges, dtype=torch.int64)
        for first, hist in self.parts:  # pieces sharing a range add up
            counts[first:first + hist.shape[1]] += hist[row, :, key]
        return counts


Band = Tuple[int, int]
Bands = Tuple[Band, ...]  # one model's bands, ascending, at least one bin apart
EVERY_BIN: Bands = ((0, LEVEL1_BINS - 1),)


def _band_start(backend, n: int, range_size: int) -> Optional[int]:
    """Flat index from which the level-1 pass counts bands (whole ranges past the first
    SAMPLE_SHARE of the entries), or None where every bin is counted throughout."""
    if not getattr(backend, "HISTOGRAM_BANDS", False) or n < SAMPLE_MIN_ENTRIES:
        return None
    start = -(-int(n * SAMPLE_SHARE) // range_size) * range_size
    return start if start < n else None


def _rank_band(counts: torch.Tensor, rank: int, n: int) -> Band:
    """The level-1 bins [lo, hi] that descending rank `rank` of n entries very likely falls in,
    judged from one model's level-1 counts of a prefix of the tensor ([bins])."""
    seen = int(counts.sum())
    share = rank / n
    expected = share * seen
    margin = SAMPLE_SIGMAS * (expected * (1 - share)) ** 0.5 + SAMPLE_SLACK * seen
    top, bottom = int(expected - margin), int(expected + margin)  # prefix ranks; past either end,
    hi = _locate(counts, top)[0] if top > 0 else LEVEL1_BINS - 1  # keys not seen yet count
    lo = _locate(counts, bottom)[0] if bottom < seen - 1 else 0
    return lo, hi


def _joined(bands: Sequence[Band]) -> Bands:
    """The union of `bands` as ascending bands with at least one bin between two."""
    joined: List[Band] = []
    for lo, hi in sorted(bands):
        if joined and lo <= joined[-1][1] + 1:
            joined[-1] = (joined[-1][0], max(joined[-1][1], hi))
        else:
            joined.append((lo, hi))
    return tuple(joined)


def _bands(counts: torch.Tensor, ranks: Dict[int, List[int]], models: List[int], n: int) -> Optional[List[Bands]]:
    """Per model, the bands of level-1 bins that its ranks very likely fall in, judged from the
    level-1 counts of a prefix of the tensor ([models, bins]); EVERY_BIN where they would hold
    more than MAX_BAND_SHARE of the prefix; None where no model has narrow bands."""
    bands = []
    for row, model in enumerate(models):
        joined = _joined([_rank_band(counts[row], rank, n) for rank in ranks[model]])
        inside = sum(int(counts[row, lo:hi + 1].sum()) for lo, hi in joined)
        bands.append(joined if inside <= MAX_BAND_SHARE * int(counts[row].sum()) else EVERY_BIN)
    return bands if any(band != EVERY_BIN for band in bands) else None


def _level1(backend, base: torch.Tensor, inputs: Sequence[torch.Tensor], models: List[int], pieces: Pieces,
            ranks: Optional[Dict[int, List[int]]]
            ) -> Tuple[torch.Tensor, Optional[RangeCounts], int, Optional[List[Bands]]]:
    """Level-1 histograms: totals [models, bins] and, when the backend gives them, per-range
    counts over ranges of `range_size` flat entries. With `ranks` (model -> its ranks) and a
    backend that counts bands, entries past `_band_start` are counted only in each model's bands
    (`_bands` of the counts so far) and the lumps around them, whose totals still give every rank
    inside a band exactly; the bands used are returned (None: every bin was counted)."""
    range_size = level1_range_size(pieces.n)
    # A bin counts at most n entries: int32 sums (7x faster than adding into int64) while they fit.
    totals = torch.zeros(len(models), LEVEL1_BINS, dtype=torch.int32 if pieces.n < 2**31 else torch.int64)
    per_range: Optional[RangeCounts] = RangeCounts(-(-pieces.n // range_size))
    band_start = _band_start(backend, pieces.n, range_size) if ranks else None
    bands: Optional[List[Bands]] = None
    decided = band_start is None
    for start, stop, piece in pieces.walk([base, *inputs]):
        cuts = [start, band_start, stop] if band_start is not None and start < band_start < stop else [start, stop]
        for first, last in zip(cuts, cuts[1:]):
            if not decided and first >= band_start:
                bands, decided = _bands(totals.to(torch.int64), ranks, models, pieces.n), True
            part_base, *part_inputs = [t[first - start:last - start] for t in piece]
            banded = {"bands": bands} if bands is not None else {}
            hist = backend.histogram_level1(part_base, part_inputs, models, range_size, **banded).cpu()
            if hist.dim() == 3 and per_range is not None:
                per_range.add(first // range_size, hist)
            else:
                per_range = None
            for counts in hist.reshape(len(models), -1, LEVEL1_BINS).unbind(1):
                totals += counts.to(totals.dtype)  # no copy for the CPU backend's int32
    return totals.to(torch.int64), per_range, range_size, bands


def _locate_level1(backend, base: torch.Tensor, inputs: Sequence[torch.Tensor], models: List[int],
                   queries: List[Tuple[int, int]], pieces: Pieces):
    """For each query (model, rank): (model, rank, level-1 bin holding the rank, rank left inside
    that bin), with the per-range counts and range size of `_level1`. Where a rank fell outside
    its model's bands (the prefix misled), every bin is counted again."""
    ranks: Optional[Dict[int, List[int]]] = {i: [rank for model, rank in queries if model == i] for i in models}
    while True:
        hist1, per_range, range_size, bands = _level1(backend, base, inputs, models, pieces, ranks)
        located = []
        for i, rank in queries:
            b, above = _locate(hist1[models.index(i)], rank)
            located.append((i, rank, b, rank - above))
        if bands is None or all(any(lo <= b <= hi for lo, hi in bands[models.index(i)]) for i, _, b, _ in located):
            return located, per_range, range_size
        ranks = None


def rank_thresholds(backend, base: torch.Tensor, inputs: Sequence[torch.Tensor], plan: GtaPlan,
                    pieces: Optional[Pieces] = None) -> Dict[Tuple[int, int], Threshold]:
    """Thresholds for every (model, rank) the plan's KEEP_RANKS rules need."""
    base, inputs = base.reshape(-1), [x.reshape(-1) for x in inputs]
    n = base.numel()
    pieces = pieces or Pieces.whole(n)
    wanted: Dict[Tuple[int, int], Threshold] = {}
    queries: List[Tuple[int, int]] = []
    for i, rule in enumerate(plan.rules):
        if rule.kind != KEEP_RANKS:
            continue
        for rank in (rule.rank_lo, rule.rank_hi):
            if rank <= 0:
                wanted[(i, rank)] = NOTHING
            elif rank >= n:
                wanted[(i, rank)] = EVERYTHING
            elif (i, rank) not in queries:
                queries.append((i, rank))
    if not queries:
        return wanted

    models = sorted({i for i, _ in queries})
    located, per_range, range_size = _locate_level1(backend, base, inputs, models, queries, pieces)

    compute_dtype = pieces.cast or base.dtype
    shift = level1_shift(compute_dtype)
    if shift:
        rows, prefixes = [q[0] for q in located], [q[2] for q in located]
        hist2 = sum(backend.histogram_level2(piece_base, piece_inputs, rows, prefixes).cpu()
                    for _, _, (piece_base, *piece_inputs) in pieces.walk([base, *inputs]))
        refined = []
        for row, (i, rank, b, left) in enumerate(located):
            low, above = _locate(hist2[row], left)
            refined.append((i, rank, (b << shift) | low, left - above))
        located = refined

    # Ties need a cut index, except at magnitude 0: zero entries contribute nothing and never
    # win a sign election, so which of them count as kept cannot change the result.
    tied = [(i, rank, key, left) for i, rank, key, left in located if left > 0 and key != 0]
    for i, rank, key, left in located:
        if left == 0 or key == 0:
            wanted[(i, rank)] = Threshold(key, 0)
    if tied and per_range is not None and not shift:  # exact 16-bit keys: counts per range exist
        for i, rank, key, left in tied:
            counts = per_range.counts(models.index(i), key)
            wanted[(i, rank)] = Threshold(key, _cut_index(backend, pieces, base, inputs[i], key, left, counts, range_size))
    elif tied:
        rows, keys = [q[0] for q in tied], [q[2] for q in tied]
        counts = torch.cat([backend.chunk_counts(piece_base, piece_inputs, rows, keys, TIE_CHUNK).cpu()
                            for _, _, (piece_base, *piece_inputs) in pieces.walk([base, *inputs])], dim=1)
        for row, (i, rank, key, left) in enumerate(tied):
            wanted[(i, rank)] = Threshold(key, _cut_index(backend, pieces, base, inputs[i], key, left, counts[row], TIE_CHUNK))
    return wanted


def _nth_chunk(counts: torch.Tensor, left: int) -> Tuple[int, int]:
    """The chunk holding the `left`-th (0-based) counted entry, and its rank inside the chunk."""
    cumulative = torch.cumsum(counts.to(torch.int64), 0)
    index = int(torch.searchsorted(cumulative, left, right=True))
    return index, left - (int(cumulative[index - 1]) if index else 0)


def _cut_index(backend, pieces: Pieces, base: torch.Tensor, x: torch.Tensor, key: int, left: int,
               counts: torch.Tensor, chunk: int) -> int:
    """Flat index of the `left`-th (0-based) entry whose key equals `key`, given the number of
    such entries in each chunk of `chunk` flat entries: that chunk is searched a piece at a time
    (`_nth_in_piece`)."""
    n = base.numel()
    index, left = _nth_chunk(counts, left)
    start, stop = index * chunk, min((index + 1) * chunk, n)
    step = max(pieces.size, TIE_CHUNK)
    for first in range(start, stop, step):
        last = min(stop, first + step)
        piece_x, piece_base = pieces.read([x, base], first, last)
        position, found = _nth_in_piece(backend, piece_base, piece_x, key, left)
        pieces.release(first, last)
        if position is not None:
            return first + position
        left -= found
    raise AssertionError("tie counts and the data disagree")


def _nth_in_piece(backend, base: torch.Tensor, x: torch.Tensor, key: int, left: int) -> Tuple[Optional[int], int]:
    """(position of the `left`-th (0-based) entry of the piece whose key equals `key`, or None;
    the number of such entries counted). The backend's `nth_key_index` scans for it where it has
    one (the CPU); otherwise it counts them per TIE_CHUNK and one TIE_CHUNK is scanned here."""
    if hasattr(backend, "nth_key_index"):
        position, found = backend.nth_key_index(base, x, key, left)
        return (position if position >= 0 else None), found
    fine = backend.chunk_counts(base, [x], [0], [key], TIE_CHUNK).cpu()[0]
    found = int(fine.sum())
    if left >= found:
        return None, found
    sub, left = _nth_chunk(fine, left)
    sub_start = sub * TIE_CHUNK
    keys = magnitude_keys(x[sub_start:sub_start + TIE_CHUNK] - base[sub_start:sub_start + TIE_CHUNK])
    return sub_start + int(torch.nonzero(keys.cpu() == key).reshape(-1)[left]), found
