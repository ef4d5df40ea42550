"""CPU path of `grouped_moe`: sort the token-expert pairs by expert, gather each expert's tokens
once, run one gate-up and one down matmul per non-empty expert into two preallocated sorted
buffers, then weight all rows and add them back into token order with one accumulating
`index_put_`. Same math as `grouped_moe_reference` (fp32 accumulation in the matmuls, the
intermediate in the input dtype; the down projection is also rounded to it before weighting);
no [T, E, H] tensor and no per-token weight copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    x = hidden.index_select(0, tokens)
    h = torch.empty(x.shape[0], inter, dtype=hidden.dtype)
    y = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            _expert(x[start:end], gate_up_proj[expert], down_proj[expert], inter, h[start:end], y[start:end])
            start = end
    weights = topk_weights.reshape(-1).index_select(0, order).float()
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    out.index_put_((tokens,), y.float().mul_(weights[:, None]), accumulate=True)
    return out.to(hidden.dtype)


def _expert(x, gate_up, down, inter, h, y) -> None:
    """y = down @ (silu(g) * u) with [g; u] = gate_up @ x, for one expert's rows x (into h and y)."""
    projected = torch.mm(x, gate_up.t())  # [M, 2I]
    torch.mul(F.silu(projected[:, :inter]), projected[:, inter:], out=h)
    torch.mm(h, down.t(), out=y)
