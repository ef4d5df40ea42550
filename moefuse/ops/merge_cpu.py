"""CPU backend of the merge engine: thin wrappers over the C++ extension `moefuse._C`.

Importing this module fails with ImportError when the extension was not built; the dispatcher
then falls back to the reference. Kernel semantics: `moefuse.ops.gta_pipeline`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from moefuse import _C
from moefuse.ops.select import level1_shift


def count_nonfinite(tensors: Sequence[torch.Tensor]) -> List[int]:
    return list(_C.count_nonfinite([t.contiguous() for t in tensors]))


HISTOGRAM_BANDS = True  # histogram_level1 can count only a band of bins (moefuse.ops.select)


def histogram_level1(base: torch.Tensor, inputs: Sequence[torch.Tensor], models: Sequence[int],
                     range_size: int, bands: Optional[Sequence[Sequence[Tuple[int, int]]]] = None) -> torch.Tensor:
    """Per-range level-1 histograms (int32 [models, ceil(n / range_size), bins]): they also
    locate threshold ties, which spares the tie-count pass for 16-bit dtypes. With `bands`, per
    model its bands (lo, hi), ascending with at least one bin between two: only their bins are
    counted one by one; bin lo - 1 of the first band holds the keys below it, bin hi + 1 of each
    band the keys between it and the next band (above it, for the last)."""
    flat = [[bin_ for band in model_bands for bin_ in band] for model_bands in bands] if bands else []
    return _C.histogram_level1(base, [inputs[i] for i in models], level1_shift(base.dtype), range_size, flat)


def histogram_level2(base, inputs, models: Sequence[int], prefixes: Sequence[int]) -> torch.Tensor:
    return _C.histogram_level2(base, [inputs[i] for i in models], list(prefixes))


def chunk_counts(base, inputs, models: Sequence[int], keys: Sequence[int], chunk: int) -> torch.Tensor:
    return _C.chunk_counts(base, [inputs[i] for i in models], list(keys), chunk)


def nth_key_index(base: torch.Tensor, x: torch.Tensor, key: int, left: int) -> Tuple[int, int]:
    """(flat index of the `left`-th (0-based) entry of x - base whose magnitude key is `key`, or -1;
    the number of such entries counted: up to and including it, or all of them)."""
    return _C.nth_key_index(base, x, key, left)


RECORDS_RANDOM_KEEPS = True  # l1_norms records (or replays) random keep decisions; fused_gta replays them


def l1_norms(base, inputs, rules: torch.Tensor, seed: int, offset: int, random_keeps: Sequence[torch.Tensor] = (),
             replay: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    return _C.l1_norms(base, list(inputs), rules, seed, offset, list(random_keeps), replay)


def fused_gta(base, inputs, rules, seed, coefficients, weights, consensus, normalize, weight_sum, lam,
              out_dtype, offset: int, random_keeps: Sequence[torch.Tensor] = (),
              out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[int]]:
    out, nonfinite = _C.fused_gta(
        base, list(inputs), rules, seed, list(coefficients), list(weights), consensus, normalize,
        weight_sum, lam, out_dtype, offset, list(random_keeps), out,
    )
    return out, list(nonfinite)


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float], out_dtype: torch.dtype,
                 out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[int]]:
    out, nonfinite = _C.weighted_sum([t.contiguous() for t in tensors], list(coefficients), out_dtype, out)
    return out, list(nonfinite)


def model_stock_rows(base: torch.Tensor, inputs: Sequence[torch.Tensor], row_length: int,
                     out_dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[int]]:
    """Filter-wise Model Stock of flat tensors holding whole rows of `row_length` entries (one
    interpolation factor per row), into `out` where given; also the NaN/Inf counts of the base,
    then of each input."""
    out, nonfinite = _C.model_stock_rows(base.contiguous().reshape(-1), [x.contiguous().reshape(-1) for x in inputs],
                                         row_length, out_dtype, out)
    return out, list(nonfinite)


def della_keep(base: torch.Tensor, x: torch.Tensor, probability: torch.Tensor, seed: int, stream: int,
               offset: int) -> torch.Tensor:
    """DELLA's keep mask over whole rows of `probability.numel()` entries, packed: uint8
    [ceil(n / 8)], entry j in bit j % 8 of byte j / 8."""
    return _C.della_keep(base.contiguous().reshape(-1), x.contiguous().reshape(-1), probability, seed, stream, offset)


def gram(tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> torch.Tensor:
    base = base.contiguous() if base is not None else None
    return _C.gram([t.contiguous() for t in tensors], base)
