"""Row-local merges streamed in blocks of whole rows.

Two methods have no flat-piece kernel: DELLA keeps each entry with a probability set by the rank
of its |delta| within its row (along dim 1), and filter-wise Model Stock interpolates every filter
(a row along the last dim) with a factor of its own. Both are local to rows, apart from DELLA's
L1 rescale, which sums over the whole tensor. So instead of holding whole tensors (the reference
allocates several fp32 and int64 copies of every input), `merge_row_blocks` walks blocks of whole
rows (with the C++ or reference CPU path one block per thread in flight, a single block on the
caller's thread; with Triton or on a GPU blocks of GPU_BLOCK_ENTRIES, one at a time, on the
caller's thread):

    DELLA                    1. (rescale "l1" only) each model's L1 norm before and after its mask
                             2. combine (the masks follow flat indices, so both passes agree)
    filter-wise Model Stock  one pass: each block's filters interpolated

With a backend that has DELLA's `della_keep` kernel (the C++ extension: a radix sort per row and
SIMD Philox; Triton: torch's segmented sort for the ranks, then one kernel for the draws) and
contiguous rows (tensors of at most 2 dims), DELLA runs in the backend's kernels: the masks are
packed into bits and replayed as the recorded decisions of random rules that keep nothing by
themselves (`moefuse.ops.gta_pipeline`), by the L1-norm pass and by the fused combine pass; the L1
pass keeps them for the combine where blocks start on whole bytes. With a backend that has
`model_stock_rows` (C++: a row at a time in cache; Triton: per-row Gram tiles, then a weighted sum
with per-row coefficients), filter-wise Model Stock runs in that kernel. Otherwise blocks of
ROW_BLOCK_ENTRIES (GPU_BLOCK_ENTRIES on a GPU) run the plain-PyTorch reference math. On the CPU
the kernels take blocks of FUSED_BLOCK_ENTRIES. Each output block is handed to `emit` as it is
produced. The numbers are the reference's within fp32 rounding; the L1 norms and Gram entries are
summed in another order.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Deque, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch

from moefuse.methods import MethodSpec
from moefuse.ops.gta_pipeline import Allocate, encode_rules, output_buffer, weight_sum_divisor
from moefuse.ops.merge_reference import (
    combine_kept,
    della_rank_probabilities,
    keep_masks,
    l1_norms_reference,
    model_stock_reference,
    task_vectors,
)
from moefuse.ops.pieces import Pieces, add_counts
from moefuse.ops.plan import KEEP_DELLA, KEEP_RANDOM, GtaPlan, KeepRule

ROW_BLOCK_ENTRIES = 1 << 16
# DELLA with the C++ kernels keeps few bytes per entry (its masks: a bool and a bit per input), so
# its blocks are larger: each block then pays Python's per-block work (which holds the GIL) once
# for 2^20 entries, not 2^16 (with 2^16 the two workers waited on the GIL: 47 s for 4 x 1.98 GB).
FUSED_BLOCK_ENTRIES = 1 << 20
FUSED_BYTES_PER_ENTRY = 2  # per block entry and input: its bool mask and its bits, rounded up
# On a GPU (and with Triton) blocks run one at a time, large enough that their kernel launches (a
# few dozen per block for the reference) cost little, and small enough that the temporaries stay a
# few GB (the reference's below; Triton's DELLA ranks take about 32 bytes per entry of one input).
GPU_BLOCK_ENTRIES = 1 << 24
# The reference's temporaries per block entry and input (measured: DELLA 24 bytes, Model Stock 14).
REFERENCE_BYTES_PER_ENTRY = 32
T = TypeVar("T")
MergeBlock = Callable[[torch.Tensor, List[torch.Tensor], int], torch.Tensor]
BlockWork = Callable[[int, List[torch.Tensor]], Tuple[List[int], torch.Tensor]]


def independent_slice(spec: MethodSpec, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Shape of the smallest trailing slices the method merges independently of each other: a
    slice along dim 0 for DELLA (ranks run along dim 1), one filter for filter-wise Model Stock;
    the whole shape where the method is not row-local (DELLA below 2-D, scalars)."""
    if spec.family == "model_stock":
        return tuple(shape[-1:])
    return tuple(shape[1:]) if len(shape) >= 2 else tuple(shape)


def merge_row_blocks(backend, spec: MethodSpec, plan: GtaPlan, base: torch.Tensor, inputs: Sequence[torch.Tensor],
                     shape: Tuple[int, ...], pieces: Pieces, out_dtype: torch.dtype,
                     emit: Callable[[torch.Tensor], None], allocate: Optional[Allocate] = None) -> List[int]:
    """Merge flat `base` and `inputs` (DELLA when `plan` is given, else filter-wise Model Stock)
    block by block, reading through `pieces`' release and cast; returns the NaN/Inf count of the
    base and of each input. `backend`: a backend module (or None), for its `della_keep` and
    `model_stock_rows` kernels where it has them. Those kernels write each block into
    `allocate(entries, dtype)` where given (called from the worker threads)."""
    inputs = list(inputs)
    row = independent_slice(spec, shape)
    row_numel = math.prod(row)
    whole = row == tuple(shape) or row_numel == 0
    if plan is None:
        fused = hasattr(backend, "model_stock_rows")
    else:  # the mask kernel needs contiguous rows (blocks of at most 2 dims), the passes replayed keeps
        fused = len(shape) <= 2 and hasattr(backend, "della_keep") and getattr(backend, "RECORDS_RANDOM_KEEPS", False)
    block_entries, workers = _block_layout(backend, base.device, fused)
    rows_per_block = max(1, block_entries // max(row_numel, 1))
    if rows_per_block >= 8:
        rows_per_block -= rows_per_block % 8  # blocks start on whole bytes of DELLA's bit masks
    blocks = Pieces(pieces.n, max(1, pieces.n if whole else rows_per_block * row_numel), pieces.release, pieces.cast)

    def shaped(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        block_shape = tuple(shape) if whole else (tensors[0].numel() // row_numel, *row)
        return [t.reshape(block_shape) for t in tensors]

    if plan is None and fused:
        def stock_work(start: int, piece: List[torch.Tensor]) -> Tuple[List[int], torch.Tensor]:
            out, counts = backend.model_stock_rows(piece[0], piece[1:], max(row_numel, 1), out_dtype,
                                                   out=output_buffer(allocate, piece[0].numel(), out_dtype))
            return counts, out

        return _emit_blocks(blocks, [base, *inputs], emit, stock_work, workers)
    if plan is None:
        return _emit_blocks(blocks, [base, *inputs], emit, _reference_work(
            shaped, out_dtype, lambda b, xs, start: model_stock_reference(b, xs, filter_wise=True)), workers)
    if fused:
        return _fused_della(backend, plan, blocks, [base, *inputs], shaped, out_dtype, emit, workers, allocate)

    def block_norms(start: int, piece: List[torch.Tensor]) -> torch.Tensor:
        piece_base, *piece_inputs = shaped(piece)
        deltas = task_vectors(piece_base, piece_inputs)
        return l1_norms_reference(deltas, keep_masks(deltas, plan, start))

    scales = plan.static_scales()
    if scales is None:
        scales = _l1_scales(plan, blocks, [base, *inputs], block_norms, workers)

    def della_block(piece_base: torch.Tensor, piece_inputs: List[torch.Tensor], start: int) -> torch.Tensor:
        deltas = task_vectors(piece_base, piece_inputs)
        return combine_kept(piece_base, deltas, keep_masks(deltas, plan, start), plan, scales)

    return _emit_blocks(blocks, [base, *inputs], emit, _reference_work(shaped, out_dtype, della_block), workers)


def _l1_scales(plan: GtaPlan, blocks: Pieces, tensors: List[torch.Tensor],
               block_norms: Callable[[int, List[torch.Tensor]], torch.Tensor], workers: int) -> List[float]:
    """The L1 rescale factors from every block's norms (float64 [models, 2]: before, after the mask)."""
    norms = torch.zeros(len(tensors) - 1, 2, dtype=torch.float64)
    for block in _map_blocks(blocks, tensors, block_norms, workers):
        norms += block.cpu()
    return plan.l1_scales(norms[:, 0].tolist(), norms[:, 1].tolist())


def _fused_della(backend, plan: GtaPlan, blocks: Pieces, tensors: List[torch.Tensor], shaped,
                 out_dtype: torch.dtype, emit: Callable[[torch.Tensor], None], workers: int,
                 allocate: Optional[Allocate]) -> List[int]:
    """DELLA with the backend's kernels: masks by its `della_keep`, packed into bits and replayed as the
    recorded decisions of random rules whose own draws keep nothing (threshold 0) by the L1-norm
    and fused passes. Where every block starts on a byte of a tensor-wide bit buffer, the L1 pass
    keeps the masks there (ceil(n / 8) bytes per input) and the combine pass reuses them; otherwise
    the combine pass ranks again."""
    replayed = replace(plan, rules=tuple(
        KeepRule(KEEP_RANDOM, threshold32=0, density=r.density) if r.kind == KEEP_DELLA else r for r in plan.rules))
    rules = encode_rules(replayed, {})

    def packed_masks(start: int, piece: List[torch.Tensor]) -> List[torch.Tensor]:
        shaped_base, *shaped_inputs = shaped(piece)
        return [_della_bits(backend, shaped_base, x, rule, plan.seed, i, start) if rule.kind == KEEP_DELLA
                else torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)  # keeps all or nothing itself
                for i, (x, rule) in enumerate(zip(shaped_inputs, plan.rules))]

    scales = plan.static_scales()
    kept_bits = None
    if scales is None:
        if blocks.size % 8 == 0 or blocks.size >= blocks.n:
            kept_bits = torch.empty(len(tensors) - 1, (blocks.n + 7) // 8, dtype=torch.uint8, device=tensors[0].device)

        def block_norms(start: int, piece: List[torch.Tensor]) -> torch.Tensor:
            bits = packed_masks(start, piece)
            if kept_bits is not None:
                kept_bits[:, start // 8:start // 8 + bits[0].numel()] = torch.stack(bits)
            before, after = backend.l1_norms(piece[0], piece[1:], rules, plan.seed, start, random_keeps=bits,
                                             replay=True)
            return torch.stack([before, after], dim=1)

        scales = _l1_scales(plan, blocks, tensors, block_norms, workers)
    coefficients = [w * s for w, s in zip(plan.weights, scales)]

    def work(start: int, piece: List[torch.Tensor]) -> Tuple[List[int], torch.Tensor]:
        if kept_bits is None:
            bits = packed_masks(start, piece)
        else:
            bits = list(kept_bits[:, start // 8:(start + piece[0].numel() + 7) // 8])
        out, counts = backend.fused_gta(piece[0], piece[1:], rules, plan.seed, coefficients, list(plan.weights),
                                        plan.consensus, plan.normalize, weight_sum_divisor(plan), plan.lam,
                                        out_dtype, start, random_keeps=bits,
                                        out=output_buffer(allocate, piece[0].numel(), out_dtype))
        return counts, out

    return _emit_blocks(blocks, tensors, emit, work, workers)


def _della_bits(backend, base: torch.Tensor, x: torch.Tensor, rule, seed: int, model: int,
                offset: int) -> torch.Tensor:
    """DELLA's mask of a block of at most 2 dims (rows along dim 1) by the backend's kernel, packed
    (entry j in bit j % 8 of byte j / 8)."""
    row_length = x.shape[-1] if x.dim() == 2 else x.numel()
    probability = della_rank_probabilities(row_length, rule.density, rule.epsilon, x.device)
    return backend.della_keep(base, x, probability, seed, model, offset)


def _reference_work(shaped, out_dtype: torch.dtype, merge_block: MergeBlock) -> BlockWork:
    """A block's work with the reference math: its NaN/Inf counts and its merged entries."""
    def work(start: int, piece: List[torch.Tensor]) -> Tuple[List[int], torch.Tensor]:
        piece_base, *piece_inputs = shaped(piece)
        counts = [int((~torch.isfinite(t)).sum()) for t in piece]
        return counts, merge_block(piece_base, piece_inputs, start).to(out_dtype).reshape(-1)

    return work


def _emit_blocks(blocks: Pieces, tensors: List[torch.Tensor], emit: Callable[[torch.Tensor], None],
                 work: BlockWork, workers: int) -> List[int]:
    """Emits every block's output in order; returns the NaN/Inf counts summed over the blocks."""
    totals = [0] * len(tensors)
    for counts, out in _map_blocks(blocks, tensors, work, workers):
        totals = add_counts(totals, counts)
        emit(out)
    return totals


def _single_threaded() -> None:
    torch.set_num_threads(1)  # this worker thread's own setting (OpenMP keeps it per thread)


def row_block_bytes(spec: MethodSpec, shape: Tuple[int, ...], entry_bytes: int, inputs: int) -> int:
    """Upper bound of the memory of the blocks in flight for a row-local merge of a tensor of
    `shape`, with `entry_bytes` of input and output data per entry: the larger of the reference's
    blocks and the C++ kernels' (whichever the backend runs)."""
    numel = math.prod(shape)
    row = math.prod(independent_slice(spec, shape))
    reference = max(row, min(numel, ROW_BLOCK_ENTRIES)) * (entry_bytes + REFERENCE_BYTES_PER_ENTRY * (inputs + 1))
    fused = max(row, min(numel, FUSED_BLOCK_ENTRIES)) * (entry_bytes + FUSED_BYTES_PER_ENTRY * inputs)
    return max(reference, fused) * blocks_in_flight()


def blocks_in_flight() -> int:
    """Blocks in flight on the CPU: one per thread."""
    return max(1, torch.get_num_threads())


def _block_layout(backend, device: torch.device, fused: bool) -> Tuple[int, int]:
    """(entries per block, blocks in flight): on the CPU one block per thread, of
    FUSED_BLOCK_ENTRIES for the C++ kernels or ROW_BLOCK_ENTRIES for the reference; on a GPU, or
    with a backend that runs ONE_BLOCK_AT_A_TIME (Triton), one block of GPU_BLOCK_ENTRIES at a time."""
    if device.type != "cpu" or getattr(backend, "ONE_BLOCK_AT_A_TIME", False):
        return GPU_BLOCK_ENTRIES, 1
    return (FUSED_BLOCK_ENTRIES if fused else ROW_BLOCK_ENTRIES), blocks_in_flight()


def _map_blocks(blocks: Pieces, tensors: List[torch.Tensor], work: Callable[[int, List[torch.Tensor]], T],
                workers: int) -> Iterator[T]:
    """work(start, pieces of `tensors`) for every block, results in block order; a block's pages
    are released once its result has been taken. A single block, or one worker (a GPU), runs on the
    caller's thread, with its threads, CUDA device and stream. Otherwise up to `workers` blocks
    are in flight on pool threads, each single-threaded (a block is too small for torch to split
    one operation over threads profitably); the caller's thread count is restored afterwards
    (torch.set_num_threads in a worker also changes the default of threads created later)."""
    if workers == 1 or blocks.size >= blocks.n:
        for start, _, piece in blocks.walk(tensors):
            yield work(start, piece)
        return
    threads = torch.get_num_threads()
    try:
        yield from _map_blocks_on_pool(blocks, tensors, work, workers)
    finally:
        torch.set_num_threads(threads)


def _map_blocks_on_pool(blocks: Pieces, tensors: List[torch.Tensor], work: Callable[[int, List[torch.Tensor]], T],
                        workers: int) -> Iterator[T]:
    with ThreadPoolExecutor(workers, initializer=_single_threaded) as pool:
        pending: Deque[Tuple[int, int, Future]] = deque()
        ranges = iter(blocks.ranges())
        while True:
            for start, stop in itertools.islice(ranges, workers - len(pending)):
                future = pool.submit(lambda a, b: work(a, blocks.read(tensors, a, b)), start, stop)
                pending.append((start, stop, future))
            if not pending:
                return
            start, stop, future = pending.popleft()
            yield future.result()
            blocks.release(start, stop)
