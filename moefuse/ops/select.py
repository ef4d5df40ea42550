"""Rank thresholds by histogram selection (no sorting), shared by the fast backends.

Magnitude keys are the IEEE bit patterns of |d| in d's dtype (see `magnitude_keys`), which
order like |d|. The entry of descending rank r (ties by increasing flat index) is found with:

1. a histogram of `key >> LEVEL1_SHIFT` (32768 bins; exact for 16-bit dtypes),
2. for fp32, a histogram of the low 16 bits inside the chosen level-1 bin,
3. when the threshold key is shared by several entries, per-chunk counts of that key, then a
   scan of one chunk, to find the flat index where the r-th entry sits.

The result is a `Threshold(key, cut)`: an entry is among the top r iff
`key_e > key or (key_e == key and index_e < cut)`. Backends supply three kernels:

    histogram_level1(base, inputs, models) -> int64 [len(models), 32768], or counts per range
        [len(models), R, 32768] with R = level1_ranges(n) (range r: flat entries
        [r size, (r + 1) size), size = ceil(n / R)), which also locate ties for 16-bit dtypes
    histogram_level2(base, inputs, models, prefixes) -> int64 [len(models), 65536]
        (low 16 bits of keys whose high bits equal the prefix; fp32 only)
    chunk_counts(base, inputs, models, keys, chunk) -> int64 [len(models), ceil(n / chunk)]
        (entries whose key equals the given key, per chunk of `chunk` flat entries)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from moefuse.ops.merge_reference import magnitude_keys
from moefuse.ops.plan import KEEP_RANKS, GtaPlan

LEVEL1_BINS = 1 << 15
LEVEL2_BINS = 1 << 16
TIE_CHUNK = 1 << 16
MAX_RANGES = 32
MIN_RANGE = 1 << 20  # entries per range: keeps the per-range histograms small next to the tensor
NOTHING_KEY = 1 << 32  # larger than every key: no entry is inside
EVERYTHING_KEY = -1  # smaller than every key: every entry is inside


@dataclass(frozen=True)
class Threshold:
    key: int
    cut: int


NOTHING = Threshold(NOTHING_KEY, 0)
EVERYTHING = Threshold(EVERYTHING_KEY, 0)


def level1_ranges(n: int) -> int:
    """How many ranges a backend may split level-1 histograms into (1: no split)."""
    return max(1, min(MAX_RANGES, n // MIN_RANGE))


def level1_shift(dtype: torch.dtype) -> int:
    return 16 if dtype == torch.float32 else 0


def _locate(histogram: torch.Tensor, rank: int) -> Tuple[int, int]:
    """Bin holding descending rank `rank` and the number of entries in higher bins."""
    counts = histogram.numpy()
    from_top = np.cumsum(counts[::-1])  # from_top[k]: entries in the top k + 1 bins
    k = int(np.searchsorted(from_top, rank, side="right"))
    b = len(counts) - 1 - k
    return b, int(from_top[k] - counts[b])


def rank_thresholds(backend, base: torch.Tensor, inputs: Sequence[torch.Tensor], plan: GtaPlan) -> Dict[Tuple[int, int], Threshold]:
    """Thresholds for every (model, rank) the plan's KEEP_RANKS rules need."""
    n = base.numel()
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
    hist1 = backend.histogram_level1(base, inputs, models).cpu()
    per_range = hist1 if hist1.dim() == 3 and hist1.shape[1] > 1 else None
    hist1 = hist1.reshape(len(models), -1, LEVEL1_BINS).sum(dim=1, dtype=torch.int64)
    located = []  # (model, rank, key prefix, rank left inside the prefix)
    for i, rank in queries:
        b, above = _locate(hist1[models.index(i)], rank)
        located.append((i, rank, b, rank - above))

    shift = level1_shift(base.dtype)
    if shift:
        hist2 = backend.histogram_level2(
            base, inputs, [q[0] for q in located], [q[2] for q in located]
        ).cpu()
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
        size = -(-n // per_range.shape[1])
        for i, rank, key, left in tied:
            counts = per_range[models.index(i), :, key].to(torch.int64)
            wanted[(i, rank)] = Threshold(key, _cut_index(base, inputs[i], key, left, counts, size))
    elif tied:
        counts = backend.chunk_counts(
            base, inputs, [q[0] for q in tied], [q[2] for q in tied], TIE_CHUNK
        ).cpu()
        for row, (i, rank, key, left) in enumerate(tied):
            wanted[(i, rank)] = Threshold(key, _cut_index(base, inputs[i], key, left, counts[row], TIE_CHUNK))
    return wanted


def _cut_index(base: torch.Tensor, x: torch.Tensor, key: int, left: int, counts: torch.Tensor, chunk: int) -> int:
    """Flat index of the `left`-th (0-based) entry whose key equals `key`, given the number of
    such entries in each chunk of `chunk` flat entries (the chunk is scanned in small pieces)."""
    cumulative = torch.cumsum(counts, 0)
    index = int(torch.searchsorted(cumulative, left, right=True))
    left -= int(cumulative[index - 1]) if index else 0
    flat_x, flat_base = x.reshape(-1), base.reshape(-1)
    for start in range(index * chunk, min((index + 1) * chunk, base.numel()), TIE_CHUNK):
        stop = min(start + TIE_CHUNK, (index + 1) * chunk, base.numel())
        positions = torch.nonzero(magnitude_keys(flat_x[start:stop] - flat_base[start:stop]) == key).reshape(-1)
        if left < positions.numel():
            return start + int(positions[left])
        left -= positions.numel()
    raise AssertionError("tie counts and the data disagree")
