"""CPU path of `grouped_moe`: sort the token-expert pairs by expert, gather each expert's tokens
once, run one gate-up matmul and one down matmul per non-empty expert, and add the weighted rows
back into token order (accumulating `index_put_`). Same math as `grouped_moe_reference` (fp32
accumulation in the matmuls, the intermediate in the input dtype); no [T, E, H] tensor and no
per-token weight copies.
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
    num_tokens, top_k = topk_ids.shape
    inter = down_proj.shape[-1]
    flat_ids = topk_ids.reshape(-1)
    weights = topk_weights.reshape(-1)
    accumulate = torch.float32 if hidden.dtype != torch.float32 else hidden.dtype
    out = torch.zeros(hidden.shape, dtype=accumulate)
    if num_tokens * top_k == 1:
        _expert(hidden, gate_up_proj, down_proj, int(flat_ids), inter, weights, torch.zeros(1, dtype=torch.long), out)
        return out.to(hidden.dtype)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=gate_up_proj.shape[0]).tolist()
    tokens = order // top_k
    x = hidden.index_select(0, tokens)
    weights = weights.index_select(0, order)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            _expert(x[start:end], gate_up_proj, down_proj, expert, inter, weights[start:end], tokens[start:end], out)
            start = end
    return out.to(hidden.dtype)


# Below this many rows, 16-bit matmuls run faster as x @ W^T than as W @ x^T on the CPU
# (measured with oneDNN/MKL on AVX-512: W @ x^T wins for fp32 at every row count).
_ROWS_FOR_TRANSPOSED_16BIT = 32


def _expert(x, gate_up_proj, down_proj, expert, inter, weights, tokens, out) -> None:
    """out[tokens] += weights * (down[e] @ (silu(g) * u)), [g; u] = gate_up[e] @ x, for one expert.

    The two matmuls run either as x @ W^T or as (W @ x^T)^T, whichever BLAS does faster for this
    dtype and row count; both accumulate in fp32 and round once, so the results agree."""
    if x.dtype == torch.float32 or x.shape[0] >= _ROWS_FOR_TRANSPOSED_16BIT:
        gate_up = torch.mm(gate_up_proj[expert], x.t())  # [2I, M]
        h = F.silu(gate_up[:inter]).mul_(gate_up[inter:])
        y = torch.mm(down_proj[expert], h).t()
    else:
        gate_up = F.linear(x, gate_up_proj[expert])  # [M, 2I]
        h = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
        y = F.linear(h, down_proj[expert])
    # index_put_ rather than index_add_: torch's CPU index_add_ took tens of ms for a single row here.
    out.index_put_((tokens,), y.to(out.dtype) * weights.to(out.dtype)[:, None], accumulate=True)
