"""The fast GTA merge as a fixed sequence of kernel calls, shared by the CPU and Triton backends.

    1. selection   rank thresholds for magnitude/breadcrumbs rules (`moefuse.ops.select`)
    2. norms       per-model L1 norms before/after the mask, only for rescale "l1"
    3. fused pass  read base and every input once, write the output once

Each pass walks the flat inputs in `Pieces`; the fused pass hands each output piece to `emit`.
A backend module supplies the kernels named in `moefuse.ops.select` plus

    l1_norms(base, inputs, rules, seed, offset, random_keeps=(), replay=False) -> (float64 [N], float64 [N])
    fused_gta(base, inputs, rules, seed, coefficients, weights, consensus, normalize,
              weight_sum, lam, out_dtype, offset, random_keeps=(), out=None)
        -> (Tensor (`out` where given), [NaN/Inf count of base, input 0, ...])

where `offset` is the flat index of the slice's first entry (rank cuts and random draws use
indices into the whole tensor). A backend with RECORDS_RANDOM_KEEPS = True takes `random_keeps`,
one uint8 buffer of ceil(len / 8) bytes per input: l1_norms records each random keep decision
there (bit j % 8 of byte j / 8), or replays them with `replay=True`, and fused_gta replays them,
so DARE draws its Philox numbers once (and DELLA's masks, `moefuse.ops.rowwise`, are ranked once).

`rules` is an int64 [N, 5] tensor (see `encode_rules`); the per-entry semantics are those of
`moefuse.ops.merge_reference.gta_reference`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from moefuse.ops.pieces import Pieces, add_counts
from moefuse.ops.plan import KEEP_ALL, KEEP_NONE, KEEP_RANDOM, KEEP_RANKS, GtaPlan
from moefuse.ops.select import EVERYTHING, NOTHING, NOTHING_KEY, rank_thresholds

Allocate = Callable[[int, torch.dtype], torch.Tensor]  # (entries, dtype) -> a contiguous output buffer


def output_buffer(allocate: Optional[Allocate], entries: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """`allocate(entries, dtype)`, or None (the kernel makes its own output) without `allocate`."""
    return allocate(entries, dtype) if allocate is not None else None


# Columns of the rules tensor. An entry j of model i with magnitude key k is kept iff
#   (k > t_hi or (k == t_hi and j < cut_hi))          -- among the top rank_hi
#   and not (k > t_lo or (k == t_lo and j < cut_lo))  -- and not among the top rank_lo
#   and philox(seed, i, j) < random_threshold         -- 2**32 means always
T_HI, CUT_HI, T_LO, CUT_LO, RANDOM_THRESHOLD = range(5)
ALWAYS = NOTHING_KEY  # 2**32: a 32-bit draw is always below it


def encode_rules(plan: GtaPlan, thresholds) -> torch.Tensor:
    rows = []
    for i, rule in enumerate(plan.rules):
        hi, lo, random_threshold = EVERYTHING, NOTHING, ALWAYS
        if rule.kind == KEEP_NONE:
            hi = NOTHING
        elif rule.kind == KEEP_RANKS:
            hi, lo = thresholds[(i, rule.rank_hi)], thresholds[(i, rule.rank_lo)]
        elif rule.kind == KEEP_RANDOM:
            random_threshold = rule.threshold32
        elif rule.kind != KEEP_ALL:
            raise AssertionError(f"the fused pass cannot apply rule {rule.kind!r}")
        rows.append([hi.key, hi.cut, lo.key, lo.cut, random_threshold])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)


def weight_sum_divisor(plan: GtaPlan) -> float:
    """Non-consensus normalizer: sum of weights, 1 when |sum| < 1e-8 (as mergekit)."""
    total = float(sum(plan.weights))
    return 1.0 if abs(total) < 1e-8 else total


def run_gta(backend, base: torch.Tensor, inputs: Sequence[torch.Tensor], plan: GtaPlan, out_dtype: torch.dtype,
            pieces: Pieces, emit: Callable[[torch.Tensor], None], allocate: Optional[Allocate] = None) -> List[int]:
    """Merge flat `base` and `inputs`, passing the output to `emit` piece by piece (written into
    `allocate(entries, dtype)` where given); returns the NaN/Inf count of the base and of each
    input (counted by the fused pass itself, so checking inputs costs no extra read)."""
    rules = encode_rules(plan, rank_thresholds(backend, base, inputs, plan, pieces))
    scales = plan.static_scales()
    keeps = {}  # extra keyword arguments: the recorded random keep decisions of each piece
    if scales is None:
        record = getattr(backend, "RECORDS_RANDOM_KEEPS", False) and any(r.kind == KEEP_RANDOM for r in plan.rules)
        bits = torch.empty(len(inputs), (pieces.n + 7) // 8, dtype=torch.uint8, device=base.device) if record else None
        before, after = torch.zeros(plan.num_models, dtype=torch.float64), torch.zeros(plan.num_models, dtype=torch.float64)
        for start, stop, (piece_base, *piece_inputs) in pieces.walk([base, *inputs]):
            keeps[start] = {} if bits is None else {"random_keeps": list(bits[:, start // 8:(stop + 7) // 8])}
            piece_before, piece_after = backend.l1_norms(piece_base, piece_inputs, rules, plan.seed, start,
                                                         **keeps[start])
            before += piece_before
            after += piece_after
        scales = plan.l1_scales(before.tolist(), after.tolist())
    coefficients = [w * s for w, s in zip(plan.weights, scales)]
    counts = [0] * (1 + len(inputs))
    for start, stop, (piece_base, *piece_inputs) in pieces.walk([base, *inputs]):
        out, piece_counts = backend.fused_gta(
            piece_base, piece_inputs, rules, plan.seed, coefficients, list(plan.weights), plan.consensus,
            plan.normalize, weight_sum_divisor(plan), plan.lam, out_dtype, start, **keeps.get(start, {}),
            out=output_buffer(allocate, stop - start, out_dtype),
        )
        emit(out)
        counts = add_counts(counts, piece_counts)
    return counts
