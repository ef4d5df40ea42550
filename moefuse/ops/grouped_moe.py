"""`grouped_moe` and `route`: the experts and the router of a sparse MoE block, dispatched to a
backend.

Backends:
    "triton"     alignment + two grouped GEMM kernels (`moefuse.kernels.moe_*`): CUDA tensors, or
                 CPU tensors under TRITON_INTERPRET=1
    "cpu"        `grouped_moe_cpu`: one gate-up and one down matmul per non-empty expert
    "reference"  `grouped_moe_reference`: plain PyTorch, the semantic ground truth
    "auto"       triton for CUDA tensors, cpu for CPU tensors

Inference only: the fast backends have no backward. When autograd is recording and an input
requires grad, every backend runs the (differentiable) reference instead, so training and
router fine-tuning stay correct, only slower.
"""

from __future__ import annotations

from typing import Tuple

import torch

from moefuse.errors import MoeInputError
from moefuse.ops.grouped_moe_cpu import grouped_moe_cpu
from moefuse.ops.grouped_moe_reference import grouped_moe_reference, route_reference
from moefuse.ops.merge import SUPPORTED_DTYPES

BACKENDS = ("auto", "triton", "cpu", "reference")


def grouped_moe(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    backend: str = "auto",
    autotune: bool = False,
) -> torch.Tensor:
    """The routed experts of a sparse MoE block with SiLU-gated experts, for all tokens at once.

        out_t = sum_j w_tj * W_down[e_tj] @ (silu(W_gate[e_tj] @ x_t) * (W_up[e_tj] @ x_t))

    with e = topk_ids, w = topk_weights, [W_gate; W_up] = gate_up_proj[e] (gate rows first).
    Matmuls accumulate in fp32; the intermediate silu(g) * u is kept in hidden's dtype.

    Args:
        hidden: [T, H] token states (fp32, bf16 or fp16).
        gate_up_proj: [E, 2I, H] expert weights, hidden's dtype and device (any strides).
        down_proj: [E, H, I].
        topk_ids: [T, k] integer expert ids in [0, E); checked, on a GPU by a device-side assert
            (an error at the next synchronization, no host sync per call).
        topk_weights: [T, k] routing weights (any float dtype; used in fp32).
        backend: "auto", "triton", "cpu" or "reference" (see module docstring).
        autotune: on a GPU, let Triton search block sizes (first call per shape is slow).

    Returns:
        [T, H] in hidden's dtype.
    """
    _check(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)
    impl = _pick_backend(backend, hidden.device)
    if hidden.shape[0] == 0:
        return torch.zeros_like(hidden)
    tensors = (hidden, gate_up_proj, down_proj, topk_weights)
    if impl == "reference" or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return grouped_moe_reference(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)
    if impl == "cpu":
        return grouped_moe_cpu(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)
    return torch.ops.moefuse.grouped_moe_triton(hidden, gate_up_proj, down_proj, topk_ids, topk_weights, autotune)


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    softmax_after_topk: bool = False,
    renormalize: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of router logits [T, E], in fp32.

    softmax_after_topk=False: p = softmax(logits), keep the k largest, divide them by their sum
    when `renormalize` (Mixtral; Qwen-MoE and OLMoE with norm_topk_prob). softmax_after_topk=True:
    softmax over the k largest logits.

    Returns (weights fp32 [T, k], expert ids [T, k]; int32 from the Triton kernel, int64 otherwise).
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise MoeInputError(
            f"route: logits must be a float [tokens, experts] tensor, got {tuple(logits.shape)} {logits.dtype}"
        )
    if not 1 <= top_k <= logits.shape[1]:
        raise MoeInputError(f"route: top_k={top_k} must be between 1 and the number of experts ({logits.shape[1]})")
    if _pick_backend(backend, logits.device) != "triton" or (torch.is_grad_enabled() and logits.requires_grad):
        return route_reference(logits, top_k, softmax_after_topk=softmax_after_topk, renormalize=renormalize)
    from moefuse.kernels.moe_routing import route_forward

    return route_forward(logits, top_k, softmax_after_topk, renormalize)


@torch.library.custom_op("moefuse::grouped_moe_triton", mutates_args=())
def _grouped_moe_triton(
    hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, topk_ids: torch.Tensor,
    topk_weights: torch.Tensor, autotune: bool,
) -> torch.Tensor:
    """The Triton path as a torch.library op (opaque to torch.compile, with a fake below)."""
    from moefuse.kernels import moe_align, moe_grouped_gemm as gemm

    _check_triton_device(hidden)
    num_tokens, top_k = topk_ids.shape
    num_experts = gate_up_proj.shape[0]
    config = gemm.pick_config(num_tokens * top_k, num_experts, hidden.dtype)
    sorted_ids, block_experts, _ = moe_align.align_forward(topk_ids, num_experts, config["BLOCK_M"])
    h = gemm.gate_up_forward(hidden, gate_up_proj, sorted_ids, block_experts, top_k, config, autotune)
    weights = topk_weights.reshape(-1).float().contiguous()
    y = gemm.down_forward(h, down_proj, sorted_ids, block_experts, weights, config, autotune)
    return y.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


@_grouped_moe_triton.register_fake
def _grouped_moe_triton_fake(hidden, gate_up_proj, down_proj, topk_ids, topk_weights, autotune):
    return torch.empty_like(hidden)


def _check_triton_device(hidden: torch.Tensor) -> None:
    from moefuse.kernels.moe_grouped_gemm import interpreted

    on_cpu = hidden.device.type == "cpu"
    if interpreted() and not on_cpu:
        raise MoeInputError(
            f"grouped_moe: Triton runs in the interpreter (TRITON_INTERPRET=1), which needs CPU tensors, "
            f"got {hidden.device}; unset TRITON_INTERPRET or move the tensors to the CPU"
        )
    if on_cpu and not interpreted():
        raise MoeInputError(
            "grouped_moe: backend='triton' needs GPU tensors (CPU tensors only with TRITON_INTERPRET=1 set "
            "before triton is imported); use backend='cpu' or 'auto' for CPU tensors"
        )


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise MoeInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    return backend


def _check(hidden, gate_up_proj, down_proj, topk_ids, topk_weights) -> None:
    """Raise MoeInputError naming the tensor whose shape, dtype or device does not fit."""
    if hidden.dim() != 2:
        raise MoeInputError(
            f"grouped_moe: hidden must be [tokens, hidden], got shape {tuple(hidden.shape)}; "
            "flatten batch and sequence first"
        )
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise MoeInputError(f"grouped_moe: hidden has dtype {hidden.dtype}; supported: float32, bfloat16, float16")
    num_tokens, hidden_size = hidden.shape
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != hidden_size or gate_up_proj.shape[1] % 2:
        raise MoeInputError(
            f"grouped_moe: gate_up_proj must be [experts, 2 * intermediate, {hidden_size}], "
            f"got {tuple(gate_up_proj.shape)}"
        )
    experts, inter = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    if tuple(down_proj.shape) != (experts, hidden_size, inter):
        raise MoeInputError(
            f"grouped_moe: down_proj must be [{experts}, {hidden_size}, {inter}], got {tuple(down_proj.shape)}"
        )
    for name, weight in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if weight.dtype != hidden.dtype or weight.device != hidden.device:
            raise MoeInputError(
                f"grouped_moe: {name} is {weight.dtype} on {weight.device} but hidden is {hidden.dtype} on "
                f"{hidden.device}; convert the weights (or the hidden states) to match"
            )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.is_floating_point():
        raise MoeInputError(
            f"grouped_moe: topk_ids must be an integer [{num_tokens}, k] tensor, "
            f"got {tuple(topk_ids.shape)} {topk_ids.dtype}"
        )
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
        raise MoeInputError(
            f"grouped_moe: topk_weights must be a float tensor shaped like topk_ids {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)} {topk_weights.dtype}"
        )
    if topk_ids.device != hidden.device or topk_weights.device != hidden.device:
        raise MoeInputError("grouped_moe: topk_ids and topk_weights must be on hidden's device")
    if not topk_ids.numel():
        return
    if topk_ids.device.type != "cpu":
        # No host sync per MoE layer (which would stall every decode step): the device asserts.
        torch._assert_async(((topk_ids >= 0) & (topk_ids < experts)).all(),
                            f"grouped_moe: topk_ids holds expert ids outside [0, {experts})")
        return
    low, high = torch.aminmax(topk_ids)
    if low < 0 or high >= experts:
        raise MoeInputError(
            f"grouped_moe: topk_ids holds expert ids in [{int(low)}, {int(high)}], outside [0, {experts}); "
            "check the router's number of experts"
        )
