"""Patch the sparse MoE blocks of loaded transformers models to run on `moefuse.grouped_moe`.

`apply_to(model)` swaps, in place, the `forward` of every sparse MoE block it knows. The blocks
are described by a table (`FAMILIES`, keyed by `config.model_type`) of small adapters that say
where a block keeps its router and expert weights and how it routes; other block classes (such as
moefuse's own MoE models) join with `register_moe_block(cls, adapter)`.

The patched forward computes, for the flattened tokens x [T, H]:

    logits = x @ W_router^T;  (w, ids) = route(logits, k, renormalize)   (fp32, as transformers)
    out = grouped_moe(x, gate_up_proj, down_proj, ids, w) [+ shared expert]

Inference only: while a block is in training mode, or autograd is recording and the block's
input or parameters require grad, the block's original forward runs (exact, differentiable).
`revert(model)` restores the original forwards.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moefuse.errors import MoeInputError
from moefuse.ops.grouped_moe import grouped_moe, route


class MoeParts(NamedTuple):
    """What a patched block needs from a sparse MoE module."""

    router_weight: torch.Tensor  # [E, H]
    top_k: int
    renormalize: bool  # divide the top-k probabilities by their sum
    gate_up_proj: torch.Tensor  # [E, 2I, H], gate rows first
    down_proj: torch.Tensor  # [E, H, I]


@dataclass(frozen=True)
class MoeAdapter:
    """How to run one sparse MoE block class on grouped_moe.

    parts: reads router and expert tensors off a block.
    weights_in_input_dtype: cast the fp32 routing weights to the hidden dtype before use
        (Qwen-MoE and OLMoE do; Mixtral keeps them in fp32).
    shared: optional extra term added to the routed output (e.g. Qwen2-MoE's gated shared expert),
        called as shared(block, x) with x [T, H].
    """

    parts: Callable[[nn.Module], MoeParts]
    weights_in_input_dtype: bool = True
    shared: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None


def _hf_parts(renormalize: Callable[[nn.Module], bool]) -> Callable[[nn.Module], MoeParts]:
    """Parts of a transformers 5.x block: `gate` (TopKRouter) and `experts` (fused 3-D weights)."""

    def parts(block: nn.Module) -> MoeParts:
        experts = block.experts
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if getattr(experts, "is_transposed", False):  # [E, H, 2I] / [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        return MoeParts(block.gate.weight, block.gate.top_k, renormalize(block), gate_up, down)

    return parts


def _qwen2_shared_expert(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


def _norm_topk(block: nn.Module) -> bool:
    return bool(block.gate.norm_topk_prob)


@dataclass(frozen=True)
class Family:
    """A transformers model family: where its sparse MoE block class lives and its adapter."""

    module: str
    block_class: str
    adapter: MoeAdapter


FAMILIES: Dict[str, Family] = {
    "mixtral": Family(
        "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
        MoeAdapter(_hf_parts(lambda block: True), weights_in_input_dtype=False),
    ),
    "qwen2_moe": Family(
        "transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock",
        MoeAdapter(_hf_parts(_norm_topk), shared=_qwen2_shared_expert),
    ),
    "qwen3_moe": Family(
        "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", MoeAdapter(_hf_parts(_norm_topk))
    ),
    "olmoe": Family(
        "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", MoeAdapter(_hf_parts(_norm_topk))
    ),
}

_BLOCKS: Dict[type, MoeAdapter] = {}


def register_moe_block(cls: type, adapter: MoeAdapter) -> None:
    """Let `apply_to` patch modules of class `cls` (for example moefuse's own MoE blocks)."""
    _BLOCKS[cls] = adapter


def supported_model_types() -> list:
    """The `config.model_type` values `apply_to` knows."""
    return sorted(FAMILIES)


def _family_blocks() -> Dict[type, MoeAdapter]:
    """Block classes of the table's families (imported on demand) plus registered ones."""
    blocks = dict(_BLOCKS)
    for family in FAMILIES.values():
        try:
            cls = getattr(importlib.import_module(family.module), family.block_class)
        except (ImportError, AttributeError):  # an older transformers without this family
            continue
        blocks.setdefault(cls, family.adapter)
    return blocks


def apply_to(model: nn.Module, *, backend: str = "auto") -> int:
    """Run every known sparse MoE block of `model` on `grouped_moe`, in place.

    Args:
        model: a loaded transformers model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) or any model
            holding blocks registered with `register_moe_block`.
        backend: passed to `grouped_moe` ("auto": Triton on CUDA, the CPU path on CPU).

    Returns:
        The number of blocks patched (at least one).

    Raises:
        MoeInputError: no supported MoE block in `model`, or a block uses an activation other than SiLU.
    """
    blocks = _family_blocks()
    patched = 0
    for name, module in model.named_modules():
        adapter = blocks.get(type(module))
        if adapter is None:
            continue
        _check_activation(name, module)
        if not hasattr(module, "_moefuse_original_forward"):
            module._moefuse_original_forward = module.forward
        module._moefuse_adapter = adapter
        module._moefuse_backend = backend
        module.forward = types.MethodType(_fast_forward, module)
        patched += 1
    if not patched:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise MoeInputError(
            f"apply_to: {type(model).__name__} (model_type {model_type!r}) has no supported sparse MoE block; "
            f"supported model types: {', '.join(supported_model_types())}, plus classes registered with "
            "moefuse.integrations.transformers.register_moe_block"
        )
    return patched


def revert(model: nn.Module) -> int:
    """Undo `apply_to`: give every patched block its original forward back. Returns how many."""
    count = 0
    for module in model.modules():
        original = module.__dict__.pop("_moefuse_original_forward", None)
        if original is not None:
            del module.forward, module._moefuse_adapter, module._moefuse_backend
            count += 1
    return count


def _check_activation(name: str, module: nn.Module) -> None:
    act = getattr(getattr(module, "experts", None), "act_fn", None)
    if act is not None and not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLUActivation", "SiLU"):
        raise MoeInputError(
            f"apply_to: block {name!r} uses activation {type(act).__name__}; grouped_moe fuses SiLU only"
        )


def _fast_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    tracked = torch.is_grad_enabled() and (
        hidden_states.requires_grad or any(p.requires_grad for p in self.parameters())
    )
    if self.training or tracked:
        return self._moefuse_original_forward(hidden_states)
    parts = self._moefuse_adapter.parts(self)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = F.linear(x, parts.router_weight)
    weights, ids = route(logits, parts.top_k, renormalize=parts.renormalize, backend=self._moefuse_backend)
    if self._moefuse_adapter.weights_in_input_dtype:
        weights = weights.to(x.dtype)
    out = grouped_moe(x, parts.gate_up_proj, parts.down_proj, ids, weights, backend=self._moefuse_backend)
    if self._moefuse_adapter.shared is not None:
        out = out + self._moefuse_adapter.shared(self, x)
    return out.reshape(shape)
