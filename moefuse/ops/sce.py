"""SCE merged piece by piece with torch operations (any device). Math: `moefuse.methods.sce`.

Passes over the inputs, each recomputing the task vectors d_i and their variance v of the piece:
    1. NaN/Inf counts; with 0 < select_topk < 1 also the number of nonzero v and a histogram
       of the top 16 bits of v's IEEE pattern (v >= 0, so patterns order like values)
    2. (selecting only) a histogram of the low 16 bits inside the bin the k-th largest v falls
       in: the exact k-th largest pattern T and how many of the entries equal to T to keep
    3. the sums of squares of the kept d_i (the weights)
    4. the output
The pieces should be small (`moefuse.ops.merge` walks `torch_chunk` entries at a time): the
temporaries are a few fp32 and fp64 copies of a piece per model, never of the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from moefuse.ops.pieces import CountNonfinite, Pieces, add_counts

WEIGHT_SUM_FLOOR = 1e-6  # |sum of mean squares| below this: equal weights
DIVISOR_FLOOR = 1e-6  # the erased weights' sum is clamped to at least this
_HALF = 1 << 16


def task_vectors(piece: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N, len] fp32 task vectors of a piece whose first tensor is the base."""
    return torch.stack(piece[1:]).float() - piece[0].float()


def variance(deltas: torch.Tensor) -> torch.Tensor:
    """Population variance over the models (dim 0), fp32: Welford's recurrence in fp64, model by
    model, which rounds exactly as torch.var does (and so mergekit), at a third of its time."""
    mean = deltas[0].double()  # the first step: mean = d_1, m2 = 0
    m2 = torch.zeros_like(mean)
    for k, x in enumerate(deltas[1:], 2):
        delta = x - mean
        mean += delta / k
        m2 += delta * (x - mean)
    return (m2 / deltas.shape[0]).float()


def variance_keys(deltas: torch.Tensor) -> torch.Tensor:
    """`variance` as int64 IEEE patterns (ordered like the values)."""
    return variance(deltas).view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def selected_count(nonzero: int, select_topk: float) -> int:
    """mergekit's k = int(count * density), the product taken in float32 as torch does."""
    return int(torch.tensor(nonzero) * select_topk)


@dataclass
class Cut:
    """Keep patterns above `threshold` and the first `ties` entries (in flat order) equal to it."""

    threshold: int
    ties: int

    def walker(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A mask function of the keys for one pass over the pieces in order (it counts the ties seen so far)."""
        seen = 0

        def mask(keys: torch.Tensor) -> torch.Tensor:
            nonlocal seen
            equal = keys == self.threshold
            rank = torch.cumsum(equal, 0) - 1 + seen
            seen += int(equal.sum())
            return (keys > self.threshold) | (equal & (rank < self.ties))

        return mask


def _position_from_top(histogram: torch.Tensor, k: int) -> Tuple[int, int]:
    """(bin holding the k-th largest entry, number of entries in the bins above it)."""
    from_top = torch.cumsum(histogram.flip(0), 0)
    index = int(torch.searchsorted(from_top, k))
    above = int(from_top[index - 1]) if index > 0 else 0
    return histogram.numel() - 1 - index, above


def find_cut(operands: Sequence[torch.Tensor], select_topk: float, pieces: Pieces,
             count_nonfinite: CountNonfinite) -> Tuple[Optional[Cut], List[int]]:
    """Passes 1 and 2: the cut keeping the entries of largest variance (None keeps all), and the
    NaN/Inf counts of the operands (`count_nonfinite` of a piece)."""
    selecting = 0 < select_topk < 1
    nonfinite = [0] * len(operands)
    nonzero = 0
    high = torch.zeros(_HALF // 2, dtype=torch.int64)
    for _, _, piece in pieces.walk(operands):
        nonfinite = add_counts(nonfinite, count_nonfinite(piece))
        if selecting:
            keys = variance_keys(task_vectors(piece))
            nonzero += int((keys != 0).sum())
            high += torch.bincount(keys >> 16, minlength=high.numel()).cpu()
    k = selected_count(nonzero, select_topk) if selecting else 0
    if k == 0:  # keep all (select_topk >= 1) or none
        return (None if select_topk >= 1 else Cut(0x7FFFFFFF, 0)), nonfinite
    top_bin, above = _position_from_top(high, k)
    low = torch.zeros(_HALF, dtype=torch.int64)
    for _, _, piece in pieces.walk(operands):
        keys = variance_keys(task_vectors(piece))
        low += torch.bincount(keys[(keys >> 16) == top_bin] & 0xFFFF, minlength=_HALF).cpu()
    low_bin, above_in_bin = _position_from_top(low, k - above)
    return Cut((top_bin << 16) | low_bin, k - above - above_in_bin), nonfinite


def sce_weights(squares: Sequence[float], numel: int) -> List[float]:
    """w_i = s_i / sum_j s_j for the mean squares s_i (1 / N when the sum is below the floor)."""
    means = [s / numel for s in squares]
    total = sum(means)
    if abs(total) < WEIGHT_SUM_FLOOR:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def kept_task_vectors(piece: Sequence[torch.Tensor],
                      mask: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """[N, len] fp32 task vectors of a piece (base first), zero where `mask` of their variance keys is false."""
    deltas = task_vectors(piece)
    return deltas if mask is None else deltas * mask(variance_keys(deltas))


def erase_and_average(deltas: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """sum_i m_i w_i d_i / max(sum_i m_i w_i, floor), m_i the agreement with the sign of sum_i d_i
    (zero entries never agree)."""
    positive = deltas.sum(dim=0) >= 0
    merged = torch.zeros_like(deltas[0])
    total = torch.zeros_like(merged)
    for delta, weight in zip(deltas, weights):
        kept = torch.where(positive, delta > 0, delta < 0) * weight
        merged.addcmul_(delta, kept)
        total += kept
    return merged / total.clamp(min=DIVISOR_FLOOR)


def sce_streamed(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float, pieces: Pieces,
                 count_nonfinite: CountNonfinite) -> Tuple[List[int], Iterator[torch.Tensor]]:
    """The NaN/Inf counts of base and tensors (`count_nonfinite` of a piece), and an iterator over
    the fp32 output pieces."""
    operands = [base, *tensors]
    cut, nonfinite = find_cut(operands, select_topk, pieces, count_nonfinite)
    squares = torch.zeros(len(tensors), dtype=torch.float64)
    mask = cut.walker() if cut is not None else None
    for _, _, piece in pieces.walk(operands):
        kept = kept_task_vectors(piece, mask)
        squares += (kept * kept).sum(dim=1, dtype=torch.float64).cpu()
    weights = sce_weights(squares.tolist(), max(pieces.n, 1))

    def outputs() -> Iterator[torch.Tensor]:
        mask = cut.walker() if cut is not None else None
        for _, _, piece in pieces.walk(operands):
            yield piece[0].float() + erase_and_average(kept_task_vectors(piece, mask), weights)

    return nonfinite, outputs()
