"""Triton top-k routing kernel of the sparse MoE block and its launcher.

One program routes BLOCK_T tokens: it loads their logits [BLOCK_T, E] (E and k padded to powers
of two, masked), optionally softmaxes them in fp32, picks the k largest one at a time (max, then
mask it out; the lowest expert id wins a tie) and writes fp32 weights and int32 expert ids.
Math: `moefuse.ops.grouped_moe_reference.route_reference`.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_lt, stride_le,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    x = tl.load(
        logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)
    x = tl.where(col_ok[None, :], x, -float("inf"))
    if not SOFTMAX_AFTER:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        x = e / tl.sum(e, axis=1)[:, None]
        x = tl.where(col_ok[None, :], x, -float("inf"))
    slots = tl.arange(0, BLOCK_K)
    slot_ok = slots < TOP_K
    picked = tl.full((BLOCK_T, BLOCK_K), -float("inf"), dtype=tl.float32)
    picked_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(x, axis=1)
        best_id = tl.min(tl.where(x == best[:, None], cols[None, :], BLOCK_E), axis=1)
        picked = tl.where(slots[None, :] == j, best[:, None], picked)
        picked_ids = tl.where(slots[None, :] == j, best_id[:, None], picked_ids)
        x = tl.where(cols[None, :] == best_id[:, None], -float("inf"), x)
    if SOFTMAX_AFTER:
        e = tl.exp(picked - tl.max(picked, axis=1)[:, None])
        picked = e / tl.sum(e, axis=1)[:, None]
    elif RENORMALIZE:
        picked = picked / tl.sum(tl.where(slot_ok[None, :], picked, 0.0), axis=1)[:, None]
    out = rows[:, None] * TOP_K + slots[None, :]
    keep = row_ok[:, None] & slot_ok[None, :]
    tl.store(weights_ptr + out, picked, mask=keep)
    tl.store(ids_ptr + out, picked_ids, mask=keep)


def route_forward(
    logits: torch.Tensor, top_k: int, softmax_after_topk: bool, renormalize: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, k], expert ids int32 [T, k]) for `logits` [T, E]."""
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(64, 4096 // block_e, triton.next_power_of_2(num_tokens)))
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, weights, ids, num_tokens, num_experts, logits.stride(0), logits.stride(1),
        TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), SOFTMAX_AFTER=softmax_after_topk, RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
    )
    return weights, ids
