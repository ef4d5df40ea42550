"""CPU path of `grouped_moe`: sort the token-expert pairs by expert, gather each expert's tokens
once, run the gate-up and the down projections into two preallocated sorted buffers, then weight
all rows and add them back into token order with one accumulating `index_put_`. Same math as
`grouped_moe_reference` (fp32 accumulation in the matmuls, the intermediate in the input dtype; the
down projection is also rounded to it before weighting); no [T, E, H] tensor and no per-token
weight copies.

An expert with few rows (decoding) is bound by reading its weights, and a BLAS matmul first packs
them: those experts go, all in one call, through the extension's row kernel
(`moefuse._C.expert_rows_linear`), which streams each weight row once. Experts with more rows use
one `torch.mm` each.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

# Most rows per expert for which the row kernel beat torch.mm on the 2-core AMD EPYC (AVX-512,
# AVX512-BF16) development machine, weights not in cache, one thread: fp32 1.2-2.2x up to 8 rows
# (even at 16), bf16 1.5-2.6x up to 8 rows (even at 16), fp16 1.3-1.9x from 4 to 32 rows (torch's
# fp16 matmul is slow on CPUs without native fp16; at one row the kernel is 0.7x). Without
# AVX512-BF16 the kernel converts bf16 to fp32 and led only up to 3 rows.
ROW_KERNEL_MAX_ROWS = {torch.float32: 12, torch.bfloat16: 12, torch.float16: 32}
ROW_KERNEL_MAX_ROWS_BF16_WITHOUT_DOT = 3


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
    tokens = order // top_k
    # SiLU(gate) * up is formed in place in the gate half; torch.mm reads that half with its row
    # stride (the row kernel, for experts with few rows, copies it contiguous).
    projected = _experts_linear(hidden.index_select(0, tokens), gate_up_proj, counts)
    h = F.silu(projected[:, :inter], inplace=True).mul_(projected[:, inter:])
    y = _experts_linear(h, down_proj, counts)
    del projected, h
    weights = topk_weights.reshape(-1).index_select(0, order).float()
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    out.index_put_((tokens,), y.float().mul_(weights[:, None]), accumulate=True)
    return out.to(hidden.dtype)


def _experts_linear(x: torch.Tensor, weight: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ weight[e]^T for x's rows sorted by expert (counts[e] each)."""
    out = torch.empty(x.shape[0], weight.shape[1], dtype=x.dtype)
    small = _row_kernel_limit(weight)
    if small:
        _row_kernel()(x, weight, counts, small, out, weight.dtype == torch.bfloat16 and _bf16_dot())
    start = 0
    for expert, count in enumerate(counts):
        end = start + count
        if count > small:
            torch.mm(x[start:end], weight[expert].t(), out=out[start:end])
        start = end
    return out


def _row_kernel_limit(weight: torch.Tensor) -> int:
    """ROW_KERNEL_MAX_ROWS for weight's dtype, or 0 where the row kernel cannot run (no extension,
    weight rows not contiguous)."""
    rows_contiguous = weight.stride(2) == 1 and weight.stride(1) == weight.shape[2]
    if not rows_contiguous or _row_kernel() is None:
        return 0
    if weight.dtype == torch.bfloat16 and not _bf16_dot():
        return ROW_KERNEL_MAX_ROWS_BF16_WITHOUT_DOT
    return ROW_KERNEL_MAX_ROWS.get(weight.dtype, 0)


@functools.lru_cache(maxsize=None)
def _bf16_dot() -> bool:
    from moefuse import _C

    return _C.has_bf16_dot()


@functools.lru_cache(maxsize=None)
def _row_kernel() -> Optional[Callable]:
    """`moefuse._C.expert_rows_linear`, or None when the extension was not built."""
    try:
        from moefuse import _C
    except ImportError:
        return None
    return _C.expert_rows_linear
