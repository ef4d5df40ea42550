"""CPU path of `grouped_moe`: sort the token-expert pairs by expert, gather each expert's tokens
once, run the gate-up and the down projections into two preallocated sorted buffers (SiLU(gate) *
up formed in place between them), then sum each token's k weighted rows. Same math as
`grouped_moe_reference` (fp32 accumulation in the matmuls, the intermediate in the input dtype; the
down projection is also rounded to it before weighting); no [T, E, H] tensor and no per-token
weight copies.

A BLAS matmul first packs the weights into a layout of its own, a second pass over them. The
extension's kernels (`moefuse._C.experts_linear`, all experts in one call) read them as stored:
its row kernel, for experts with few rows (decoding, bound by reading the weights), streams each
weight row once; its tile kernel, for experts with more rows in fp32 and fp16, multiplies tiles of
4 rows by 4 weight rows. Experts with more rows in bf16 use one `torch.mm` each: oneDNN's bf16
matmul beat the tile kernel there. The extension also forms SiLU(gate) * up in one pass
(`silu_mul_`) and gathers each token's rows for the weighted sum (`combine_rows`, no scatter);
without it, torch ops do both.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# Measured on the 2-core AMD EPYC (AVX-512, AVX512-BF16) development machine, weights not in cache,
# one thread, 32 experts of [768, 512]:
# - most rows per expert for which the row kernel beat the tile kernel: fp32 8 (1.6x at 2 rows,
#   even at 8), fp16 6; and torch.mm in bf16: 12 (1.5-2.6x up to 8 rows, even at 12). Without
#   AVX512-BF16 the row kernel converts bf16 to fp32 and led torch.mm only up to 3 rows.
# - the tile kernel beat torch.mm from 4 rows on in fp32 (1.2-1.5x at 8 to 32 rows) and in fp16
#   (1.5-2.2x: torch's fp16 matmul is slow on CPUs without native fp16), not in bf16: 0.6-0.8x
#   converting to fp32, 0.9-1.0x in a version with AVX512-BF16 dot products (not kept).
ROW_KERNEL_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 12, torch.float16: 6}
ROW_KERNEL_MAX_ROWS_BF16_WITHOUT_DOT = 3
TILE_KERNEL_DTYPES = (torch.float32, torch.float16)


def grouped_moe_cpu(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """[T, H] output of the experts for `hidden` [T, H] (see `grouped_moe_reference` for the math)."""
    top_k = topk_ids.shape[1]
    inter = down_proj.shape[-1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=gate_up_proj.shape[0]).tolist()
    projected = _experts_linear(hidden.index_select(0, order // top_k), gate_up_proj, counts)
    y = _experts_linear(_silu_mul(projected, inter), down_proj, counts)
    del projected
    return _combine(y, order, topk_weights)


def _experts_linear(x: torch.Tensor, weight: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ weight[e]^T for x's rows sorted by expert (counts[e] each)."""
    out = torch.empty(x.shape[0], weight.shape[1], dtype=x.dtype)
    row_kernel_rows, kernel_rows = _kernel_limits(weight)
    if kernel_rows:
        _extension().experts_linear(x, weight, counts, row_kernel_rows, kernel_rows, out,
                                    weight.dtype == torch.bfloat16 and _bf16_dot())
    start = 0
    for expert, count in enumerate(counts):
        end = start + count
        if count > kernel_rows:
            torch.mm(x[start:end], weight[expert].t(), out=out[start:end])
        start = end
    return out


def _silu_mul(projected: torch.Tensor, inter: int) -> torch.Tensor:
    """SiLU(gate) * up for projected = [gate, up] [R, 2I], formed in place in the gate half (a view
    of it is returned, which the down projection reads with its row stride)."""
    extension = _extension()
    if extension is not None and projected.dtype in ROW_KERNEL_MAX_ROWS:
        extension.silu_mul_(projected)  # one pass, rounded once
    else:
        F.silu(projected[:, :inter], inplace=True).mul_(projected[:, inter:])
    return projected[:, :inter]


def _combine(y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j w_tj * y[row of pair (t, j)] for y's rows in `order` (pairs sorted by
    expert), summed in fp32 and rounded once to y's dtype."""
    tokens, top_k = topk_weights.shape
    extension = _extension()
    if extension is not None and y.dtype in ROW_KERNEL_MAX_ROWS:  # gathers each token's k rows
        positions = torch.empty_like(order)
        positions[order] = torch.arange(order.numel())
        out = torch.empty(tokens, y.shape[1], dtype=y.dtype)
        extension.combine_rows(y, positions.view(tokens, top_k), topk_weights.float().contiguous(), out)
        return out
    weights = topk_weights.reshape(-1).index_select(0, order).float()
    out = torch.zeros(tokens, y.shape[1], dtype=torch.float32)
    out.index_put_((order // top_k,), y.float().mul_(weights[:, None]), accumulate=True)
    return out.to(y.dtype)


def _kernel_limits(weight: torch.Tensor) -> Tuple[int, int]:
    """(most rows per expert for the row kernel, most rows for the extension's kernels) for
    weight's dtype; (0, 0) where they cannot run (no extension, weight rows not contiguous)."""
    rows_contiguous = weight.stride(2) == 1 and weight.stride(1) == weight.shape[2]
    if not rows_contiguous or _extension() is None or weight.dtype not in ROW_KERNEL_MAX_ROWS:
        return 0, 0
    if weight.dtype == torch.bfloat16 and not _bf16_dot():
        return ROW_KERNEL_MAX_ROWS_BF16_WITHOUT_DOT, ROW_KERNEL_MAX_ROWS_BF16_WITHOUT_DOT
    row_kernel_rows = ROW_KERNEL_MAX_ROWS[weight.dtype]
    return row_kernel_rows, sys.maxsize if weight.dtype in TILE_KERNEL_DTYPES else row_kernel_rows


@functools.lru_cache(maxsize=None)
def _bf16_dot() -> bool:
    return _extension().has_bf16_dot()


@functools.lru_cache(maxsize=None)
def _extension() -> Optional[ModuleType]:
    """`moefuse._C`, or None when the extension was not built."""
    try:
        from moefuse import _C
    except ImportError:
        return None
    return _C
