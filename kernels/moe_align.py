"""Triton kernels that sort token-expert pairs by expert and pad each expert's run to BLOCK_M,
and their launcher.

Pair p = t * k + j (token t's j-th choice) goes to expert ids[p]. The output lists the pairs of
expert 0, then expert 1, ..., each run padded with the sentinel P (number of pairs) to a multiple
of BLOCK_M, so that every BLOCK_M-row block of the grouped GEMM belongs to one expert. Pairs of
one expert keep their order, so the result is deterministic and equals a stable sort
(`moefuse.ops.grouped_moe_reference.align_reference`).

Three launches, no atomics:
  1. `_count_kernel`: per chunk of CHUNK pairs, how many go to each expert ([chunks, E]).
  2. `_offsets_kernel` (one program): per chunk and expert, where the chunk's run starts;
     each expert's padded start; the padded total; the expert of every block (-1 past the end).
  3. `_scatter_kernel`: per chunk, each pair's rank among the earlier pairs of its expert
     (a SUB x SUB comparison per sub-tile plus running counts), and its write to sorted_ids.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

CHUNK = 1024  # pairs per program of the count and scatter kernels
SUB = 64  # pairs compared at once inside a chunk


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_pairs, num_experts,
                  CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, CHUNK, SUB):
        offs = chunk.to(tl.int64) * CHUNK + start + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + chunk * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def _offsets_kernel(counts_ptr, chunk_start_ptr, block_expert_ptr, num_padded_ptr,
                    num_chunks, num_experts, max_blocks,
                    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for chunk in range(num_chunks):
        tl.store(chunk_start_ptr + chunk * num_experts + experts, running, mask=valid)
        running += tl.load(counts_ptr + chunk * num_experts + experts, mask=valid, other=0)
    padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    begin = end - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)
    for chunk in range(num_chunks):
        at = chunk_start_ptr + chunk * num_experts + experts
        tl.store(at, tl.load(at, mask=valid, other=0) + begin, mask=valid)
    for first in range(0, max_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        row = blocks * BLOCK_M
        expert = tl.sum(((end[None, :] <= row[:, None]) & valid[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.where(row < total, expert, -1), mask=blocks < max_blocks)


@triton.jit
def _scatter_kernel(ids_ptr, chunk_start_ptr, sorted_ptr, num_pairs, num_experts,
                    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    lanes = tl.arange(0, SUB)
    running = tl.load(chunk_start_ptr + chunk * num_experts + experts, mask=experts < num_experts, other=0)
    for start in range(0, CHUNK, SUB):
        offs = chunk.to(tl.int64) * CHUNK + start + lanes
        inside = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=inside, other=-1)
        hits = ids[:, None] == experts[None, :]
        base = tl.sum(tl.where(hits, running[None, :], 0), axis=1)
        earlier = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(sorted_ptr + base + rank, offs.to(tl.int32), mask=inside)
        running += tl.sum(hits.to(tl.int32), axis=0)


def max_padded_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the number of BLOCK_M blocks after padding (known without a device sync)."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def align_forward(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the pairs of `topk_ids` [T, k] by expert, padded per expert to `block_m`.

    Returns (sorted_ids int32 [max_blocks * block_m], block_experts int32 [max_blocks] with -1 for
    blocks past the end, num_padded int32 [1]); max_blocks = `max_padded_blocks(...)`. Slots past
    num_padded and padding slots hold the sentinel P = T * k.
    """
    ids = topk_ids.reshape(-1).to(torch.int32)
    num_pairs = ids.numel()
    device = ids.device
    max_blocks = max_padded_blocks(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    block_experts = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.zeros(1, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return sorted_ids, block_experts, num_padded
    num_chunks = triton.cdiv(num_pairs, CHUNK)
    block_e = triton.next_power_of_2(num_experts)
    counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=device)
    chunk_start = torch.empty_like(counts)
    _count_kernel[(num_chunks,)](ids, counts, num_pairs, num_experts, CHUNK=CHUNK, SUB=SUB, BLOCK_E=block_e)
    _offsets_kernel[(1,)](counts, chunk_start, block_experts, num_padded, num_chunks, num_experts, max_blocks,
                          BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_B=64)
    _scatter_kernel[(num_chunks,)](ids, chunk_start, sorted_ids, num_pairs, num_experts,
                                   CHUNK=CHUNK, SUB=SUB, BLOCK_E=block_e)
    return sorted_ids, block_experts, num_padded
