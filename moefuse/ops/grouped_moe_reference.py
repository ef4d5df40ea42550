"""Plain-PyTorch references of the sparse MoE block ops: the semantic ground truth that the Triton
kernels (`moefuse.kernels.moe_*`) and the CPU path are tested against.

Notation: T tokens, H hidden size, I expert intermediate size, E experts, k experts per token.
Expert weights use the transformers layout: `gate_up_proj` [E, 2I, H] (gate rows first, then up
rows) and `down_proj` [E, H, I].
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def route_reference(
    logits: torch.Tensor, top_k: int, *, softmax_after_topk: bool = False, renormalize: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of `logits` [T, E] in fp32.

    softmax_after_topk=False: p = softmax(logits); keep the k largest p; with `renormalize`,
    divide them by their sum. softmax_after_topk=True: keep the k largest logits and softmax over
    them (the same numbers as renormalize=True above; `renormalize` is then moot).

    Returns (weights fp32 [T, k], expert ids int64 [T, k]), largest weight first.
    """
    logits = logits.float()
    if softmax_after_topk:
        values, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids
    values, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return values, ids


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Sort the token-expert pairs by expert and pad each expert's run to a multiple of `block_m`.

    Pair p = t * k + j is token t's j-th choice, expert topk_ids[t, j]. Pairs of one expert keep
    their order (stable sort). Padding slots hold the sentinel T * k; experts without pairs get
    no block.

    Example: topk_ids = [[1, 0], [1, 2]] (T=2, k=2), E=3, block_m=2 -> pairs by expert:
    0: [1], 1: [0, 2], 2: [3]; sorted_ids = [1, 4, 0, 2, 3, 4], block_experts = [0, 1, 2],
    num_padded = 6.

    Returns (sorted_ids int32 [num_padded], block_experts int32 [num_padded // block_m], num_padded).
    """
    flat = topk_ids.reshape(-1).long()
    sentinel = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    sorted_ids, block_experts, start = [], [], 0
    for expert, count in enumerate(counts):
        blocks = -(-count // block_m)
        run = torch.full((blocks * block_m,), sentinel, dtype=torch.int64)
        run[:count] = order[start:start + count]
        sorted_ids.append(run)
        block_experts += [expert] * blocks
        start += count
    sorted_ids = torch.cat(sorted_ids) if sorted_ids else torch.empty(0, dtype=torch.int64)
    return sorted_ids.int(), torch.tensor(block_experts, dtype=torch.int32), sorted_ids.numel()


def grouped_moe_reference(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts of a sparse MoE block, one (token, choice) pair at a time.

        [g; u] = gate_up_proj[e] @ x_t                  (fp32 accumulation)
        h      = round_to_dtype(silu(g) * u)            (the intermediate is kept in x's dtype)
        out_t  = sum_j  w_tj * (down_proj[e_tj] @ h)    (fp32, rounded once at the end)

    with e = topk_ids[t, j], w = topk_weights[t, j]. Returns [T, H] in hidden's dtype.
    """
    dtype = hidden.dtype
    inter = down_proj.shape[-1]
    flat_ids = topk_ids.reshape(-1).long()
    tokens = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(topk_ids.shape[1])
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in torch.unique(flat_ids).tolist():
        pairs = torch.nonzero(flat_ids == expert).reshape(-1)
        x = hidden[tokens[pairs]].float()
        gate_up = x @ gate_up_proj[expert].float().t()
        h = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(dtype).float()
        y = (h @ down_proj[expert].float().t()) * weights[pairs, None]
        out.index_add_(0, tokens[pairs], y)
    return out.to(dtype)
