"""Triton grouped expert GEMMs of the sparse MoE block, and their launchers.

Both kernels walk the expert-sorted, BLOCK_M-padded pair list of `moefuse.kernels.moe_align`:
program (m, n) takes rows m*BLOCK_M .. +BLOCK_M of it (all pairs of one expert e, or padding) and
columns n*BLOCK_N .. +BLOCK_N of the output; blocks past the padded total exit at once.

  `_gate_up_kernel`: h[r, n] = silu(x_t @ W_gate[e, n]) * (x_t @ W_up[e, n]), t = pair // k;
                     gate and up tiles share each loaded x tile; SiLU * up runs in the epilogue
                     on the fp32 accumulators; h (in the input dtype) stays in sorted row order.
  `_down_kernel`:    y[pair, n] = w_pair * (h[r] @ W_down[e, n]), fp32, written at the pair's own
                     row of a [P, H] buffer; the caller sums the k rows of each token. No
                     [T, E, H] intermediate exists.

fp32 accumulation; fp32 inputs use IEEE fp32 dot products (no TF32). In Triton's interpreter,
where `tl.dot` on bf16 is wrong, the tiles are widened to fp32 first (UPCAST).

Block sizes come from `CONFIGS` (tuned per regime of rows per expert); with `autotune=True` on a
GPU, BLOCK_N / BLOCK_K / GROUP_M / warps / stages are searched around it (BLOCK_M is fixed by the
alignment).
"""

from __future__ import annotations

import functools
from typing import Dict

import torch
import triton
import triton.language as tl

# Tuned table: rows per expert (P / E, the GEMM's effective M) -> launch config. Small M is a
# weight-streaming GEMV-like regime (narrow BLOCK_M, wide N tiles); large M is compute bound.
CONFIGS = (
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)),
    (64, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)),
    (256, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)),
    (None, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)),
)
# The interpreter runs every program in Python: small tiles keep the masked waste low.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)


def interpreted() -> bool:
    """True when these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_gate_up_kernel, triton.JITFunction)


def pick_config(num_pairs: int, num_experts: int, dtype: torch.dtype) -> Dict[str, int]:
    """The table's launch config for `num_pairs` token-expert pairs over `num_experts` experts.
    fp32 tiles take twice the shared memory of 16-bit ones, so their K step is capped at 32."""
    if interpreted():
        return dict(INTERPRETER_CONFIG)
    rows = num_pairs / max(num_experts, 1)
    config = dict(next(config for limit, config in CONFIGS if limit is None or rows <= limit))
    if dtype == torch.float32:
        config["BLOCK_K"] = min(config["BLOCK_K"], 32)
    return config


@triton.jit
def _block_coords(num_blocks_m, num_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(m, n) of this program, grouping GROUP_M row blocks so they reuse weight tiles in L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(num_cols, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _block_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M: tl.constexpr):
    """Row block pid_m of the aligned order: its rows, their (token, choice) pair ids, and which
    rows hold a pair (the rest is padding, whose ids are >= num_pairs)."""
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + rows)
    return rows, pairs, pairs < num_pairs


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, num_blocks_m, top_k, inter, hidden,
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_hm, stride_hn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_blocks_m, inter, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows, pairs, row_ok = _block_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M)
    tokens = (pairs // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xk
    g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            x, g, u = x.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(x, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, u, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, y_ptr, sorted_ptr, block_expert_ptr, topk_w_ptr,
    num_pairs, num_blocks_m, hidden, inter,
    stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_blocks_m, hidden, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows, pairs, row_ok = _block_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = ks < inter - k0
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    route_w = tl.load(topk_w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]
    y_ptrs = y_ptr + pairs[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


_TUNED_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


@functools.lru_cache(maxsize=None)
def _autotuned(kernel, block_m: int):
    """`kernel` wrapped in triton.autotune over a few configs with BLOCK_M fixed."""
    choices = [
        triton.Config(dict(BLOCK_M=block_m, BLOCK_N=n, BLOCK_K=k, GROUP_M=g), num_warps=w, num_stages=s)
        for n, k, g, w, s in (
            (64, 64, 8, 4, 4), (64, 128, 1, 4, 4), (128, 64, 8, 4, 4), (128, 64, 8, 8, 3),
            (128, 128, 8, 8, 3), (256, 64, 8, 8, 3), (64, 256, 1, 4, 3),
        )
    ]
    return triton.autotune(configs=choices, key=["num_pairs", "num_blocks_m", "hidden", "inter"])(kernel)


def _launch(kernel, config: Dict[str, int], autotune: bool, num_blocks_m: int, num_cols: int, args: tuple,
            upcast: bool, precision: str) -> None:
    grid = lambda meta: (num_blocks_m * triton.cdiv(num_cols, meta["BLOCK_N"]),)  # noqa: E731
    if autotune and not interpreted():
        _autotuned(kernel, config["BLOCK_M"])[grid](*args, UPCAST=upcast, PRECISION=precision)
        return
    meta = {key: config[key] for key in ("BLOCK_M",) + _TUNED_KEYS}
    kernel[grid](*args, UPCAST=upcast, PRECISION=precision, **meta)


def gate_up_forward(
    hidden: torch.Tensor, gate_up_proj: torch.Tensor, sorted_ids: torch.Tensor, block_experts: torch.Tensor,
    top_k: int, config: Dict[str, int], autotune: bool = False,
) -> torch.Tensor:
    """h [len(sorted_ids), I] in hidden's dtype: silu(gate) * up for every sorted pair row
    (padding rows are left unwritten)."""
    inter = gate_up_proj.shape[1] // 2
    h = torch.empty(sorted_ids.numel(), inter, dtype=hidden.dtype, device=hidden.device)
    upcast, precision = _dot_mode(hidden.dtype)
    args = (
        hidden, gate_up_proj, h, sorted_ids, block_experts,
        hidden.shape[0] * top_k, block_experts.numel(), top_k, inter, hidden.shape[1],
        hidden.stride(0), hidden.stride(1), *gate_up_proj.stride(), h.stride(0), h.stride(1),
    )
    _launch(_gate_up_kernel, config, autotune, block_experts.numel(), inter, args, upcast, precision)
    return h


def down_forward(
    h: torch.Tensor, down_proj: torch.Tensor, sorted_ids: torch.Tensor, block_experts: torch.Tensor,
    topk_weights: torch.Tensor, config: Dict[str, int], autotune: bool = False,
) -> torch.Tensor:
    """y fp32 [P, H]: row p = w_p * (down_proj[e_p] @ h_p), P = topk_weights.numel()."""
    num_pairs = topk_weights.numel()
    hidden, inter = down_proj.shape[1], down_proj.shape[2]
    y = torch.empty(num_pairs, hidden, dtype=torch.float32, device=h.device)
    upcast, precision = _dot_mode(h.dtype)
    args = (
        h, down_proj, y, sorted_ids, block_experts, topk_weights.reshape(-1),
        num_pairs, block_experts.numel(), hidden, inter,
        h.stride(0), h.stride(1), *down_proj.stride(), y.stride(0), y.stride(1),
    )
    _launch(_down_kernel, config, autotune, block_experts.numel(), hidden, args, upcast, precision)
    return y


def _dot_mode(dtype: torch.dtype):
    """(widen tiles to fp32 before tl.dot, tl.dot input_precision) for inputs of `dtype`."""
    return interpreted() and dtype == torch.bfloat16, "ieee" if dtype == torch.float32 or interpreted() else "tf32"
