"""Expert merging for MoE compression (M-SMoE style): fewer experts per layer, same architecture.

Per sparse MoE layer with E experts, compressing to N < E:
1. routing frequency f_e: how often expert e is among a token's top-k on calibration tokens;
2. the N most frequent experts are dominant (ties: lower index first);
3. every other expert joins the dominant expert whose router logits are most similar: cosine
   similarity of the experts' logit columns l_e = (logit_e(x_t))_t over the calibration tokens;
4. each group's members are aligned to its dominant expert by weight matching of their SwiGLU neurons
   (`moefuse.moe.align`), then averaged with weights f_e / sum_group f (equal weights if the group was
   never routed to);
5. the router keeps the dominant experts' rows (the merged experts' rows are dropped), and top-k
   becomes min(k, N).

If every expert of a layer is a neuron permutation of one FFN and the router normalizes its top-k
weights (Mixtral; Qwen-MoE with norm_topk_prob), the layer computes the same function after
compression to any N, in particular N = 1. Works on transformers' fused expert modules
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], router `weight` [E, H]): Mixtral, Qwen2-MoE (its
shared expert is kept as is) and Qwen3-MoE. moefuse's own MoE layout routes whole sequences, not
tokens, and is not supported here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from moefuse.errors import MoeInputError
from moefuse.io.local_files import check_tokenizer_files, checked_model_folder, read_text_file
from moefuse.io.output import atomic_output_dir, check_output_dir, copy_tokenizer_files
from moefuse.moe.align import SwiGLU, match_all, permute_ffn

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts")


@dataclass
class MoeLayer:
    """One sparse MoE block: its router (weight [E, H]) and fused experts."""

    name: str
    router: nn.Module
    experts: nn.Module
    block: nn.Module

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]


@dataclass
class RoutingStats:
    """Calibration statistics of one layer: top-k counts [E] and the Gram matrix of router logits
    sum_t l_t l_t^T [E, E] (float64), from which the logit columns' cosine similarities follow."""

    counts: torch.Tensor
    gram: torch.Tensor

    def similarity(self) -> torch.Tensor:
        norms = self.gram.diagonal().clamp_min(1e-30).sqrt()
        return self.gram / norms[:, None] / norms[None, :]


def find_moe_layers(model: nn.Module) -> List[MoeLayer]:
    """The sparse MoE blocks of a transformers model (modules with a router `gate.weight` [E, H] and
    fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I])."""
    layers = []
    for name, module in model.named_modules():
        router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        weight = getattr(router, "weight", None)
        gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if not all(isinstance(t, torch.Tensor) for t in (weight, gate_up, down)):
            continue
        e, h = weight.shape
        if gate_up.dim() == 3 and gate_up.shape[0] == e and gate_up.shape[2] == h and down.shape[:2] == (e, h):
            layers.append(MoeLayer(name, router, experts, module))
    return layers


@torch.no_grad()
def routing_statistics(model: nn.Module, layers: Sequence[MoeLayer], input_ids: torch.Tensor,
                       batch_size: int = 8) -> List[RoutingStats]:
    """Run the model on calibration `input_ids` [B, T] and collect each layer's RoutingStats from its
    router's outputs (logits [tokens, E] and top-k indices [tokens, k])."""
    stats = [RoutingStats(torch.zeros(layer.num_experts, dtype=torch.float64),
                          torch.zeros(layer.num_experts, layer.num_experts, dtype=torch.float64)) for layer in layers]

    def hook_for(index: int):
        def hook(module, args, output):
            if not (isinstance(output, tuple) and len(output) >= 3):
                raise MoeInputError(f"router {layers[index].name}.gate returned {type(output).__name__}; expected "
                                    "(logits, weights, indices) as transformers' top-k routers do")
            logits, indices = output[0].detach().double().cpu(), output[2].detach().cpu()
            stats[index].counts += torch.bincount(indices.reshape(-1), minlength=layers[index].num_experts).double()
            stats[index].gram += logits.t() @ logits
        return hook

    handles = [layer.router.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        model.eval()
        device = next(model.parameters()).device
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids=input_ids[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def group_experts(stats: RoutingStats, num_experts: int) -> List[List[int]]:
    """Groups of expert indices, one per kept expert, dominant expert first: the `num_experts` most
    frequent experts lead; every other expert joins the leader of most similar router logits."""
    order = sorted(range(len(stats.counts)), key=lambda e: (-float(stats.counts[e]), e))
    dominant = sorted(order[:num_experts])
    similarity = stats.similarity()
    groups: Dict[int, List[int]] = {d: [d] for d in dominant}
    for e in sorted(order[num_experts:]):
        leader = max(dominant, key=lambda d: (float(similarity[e, d]), -d))
        groups[leader].append(e)
    return [groups[d] for d in dominant]


def merge_group(experts: Sequence[SwiGLU], weights: torch.Tensor) -> SwiGLU:
    """Align experts[1:] to experts[0] and average all with `weights` (normalized; float32 math)."""
    dominant = SwiGLU(*(t.float() for t in experts[0]))
    rest = [SwiGLU(*(t.float() for t in e)) for e in experts[1:]]
    aligned = [dominant] + [permute_ffn(e, perm) for e, perm in zip(rest, match_all(dominant, rest))]
    weights = weights.double()
    weights = weights / weights.sum() if float(weights.sum()) > 0 else torch.full_like(weights, 1 / len(weights))
    return SwiGLU(*(sum(float(w) * ffn[part] for w, ffn in zip(weights, aligned)) for part in range(3)))


@torch.no_grad()
def _rebuild_layer(layer: MoeLayer, groups: List[List[int]], counts: torch.Tensor) -> None:
    gate_up, down, router = layer.experts.gate_up_proj, layer.experts.down_proj, layer.router.weight
    merged = [merge_group([SwiGLU.from_fused(gate_up[e], down[e]) for e in group], counts[group]) for group in groups]
    layer.experts.gate_up_proj = nn.Parameter(torch.stack([m.fused() for m in merged]).to(gate_up.dtype))
    layer.experts.down_proj = nn.Parameter(torch.stack([m.down for m in merged]).to(down.dtype))
    layer.router.weight = nn.Parameter(router[[group[0] for group in groups]].clone())
    n = len(groups)
    for module in (layer.experts, layer.router, layer.block):
        if hasattr(module, "num_experts"):
            module.num_experts = n
        if hasattr(module, "top_k"):
            module.top_k = min(module.top_k, n)


def _config_expert_field(config) -> str:
    for field in EXPERT_COUNT_FIELDS:
        if isinstance(getattr(config, field, None), int):
            return field
    raise MoeInputError(
        f"model type {getattr(config, 'model_type', '?')!r} is not a sparse MoE (its config has none of "
        f"{', '.join(EXPERT_COUNT_FIELDS)}); compress-moe takes Mixtral, Qwen2-MoE or Qwen3-MoE checkpoints"
    )


def compress_moe_model(model: nn.Module, num_experts: int, input_ids: torch.Tensor,
                       batch_size: int = 8) -> List[List[List[int]]]:
    """Compress a loaded transformers MoE in place to `num_experts` experts per layer (see the module
    docstring), with routing statistics from calibration `input_ids` [B, T] (or [T]). Updates the config
    (expert count, num_experts_per_tok = min(k, num_experts)). Returns the groups of every layer."""
    field = _config_expert_field(model.config)
    layers = find_moe_layers(model)
    if not layers:
        raise MoeInputError(f"no sparse MoE block with fused experts found in {type(model).__name__}")
    current = layers[0].num_experts
    if not isinstance(num_experts, int) or not 0 < num_experts < current:
        raise MoeInputError(f"num_experts must be an integer in [1, {current - 1}] for a model with {current} "
                            f"experts per layer, got {num_experts!r}")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.numel() == 0 or input_ids.dtype not in (torch.int32, torch.int64):
        raise MoeInputError(f"calibration input_ids must be a non-empty integer tensor, got "
                            f"{input_ids.dtype} of shape {list(input_ids.shape)}")
    vocab_size = model.get_input_embeddings().num_embeddings
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise MoeInputError(f"calibration input_ids must lie in [0, {vocab_size}) (the model's vocabulary), got "
                            f"values from {int(input_ids.min())} to {int(input_ids.max())}")
    stats = routing_statistics(model, layers, input_ids, batch_size)
    all_groups = []
    for layer, layer_stats in zip(layers, stats):
        groups = group_experts(layer_stats, num_experts)
        _rebuild_layer(layer, groups, layer_stats.counts)
        all_groups.append(groups)
    setattr(model.config, field, num_experts)
    if isinstance(getattr(model.config, "num_experts_per_tok", None), int):
        model.config.num_experts_per_tok = min(model.config.num_experts_per_tok, num_experts)
    return all_groups


def tokenize_calibration(model_dir: Path, text_path: Union[str, os.PathLike], max_tokens: int,
                    seq_len: int) -> torch.Tensor:
    """Tokenize a local text file with the checkpoint's tokenizer: up to `max_tokens` tokens as rows
    of `seq_len` [B, seq_len] (one shorter row if the text is short)."""
    from transformers import AutoTokenizer

    text = read_text_file(text_path, "calibration text")
    check_tokenizer_files(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise MoeInputError(f"no tokenizer in {model_dir} ({error}); pass pre-tokenized calibration_ids") from None
    ids = tokenizer(text, return_tensors="pt")["input_ids"].reshape(-1)[:max_tokens]
    if ids.numel() == 0:
        raise MoeInputError(f"calibration text {text_path} has no tokens")
    if ids.numel() < seq_len:
        return ids[None]
    return ids[: ids.numel() // seq_len * seq_len].reshape(-1, seq_len)


def compress_moe(model_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], num_experts: int,
                 calibration_text: Optional[Union[str, os.PathLike]] = None,
                 calibration_ids: Optional[torch.Tensor] = None, max_tokens: int = 8192, seq_len: int = 512,
                 overwrite: bool = False) -> Path:
    """Compress the MoE checkpoint in `model_dir` to `num_experts` experts per layer and write it to
    `out_dir` atomically (weights in the checkpoint's dtype, config, generation config, tokenizer).
    Calibration: a local text file tokenized with the checkpoint's tokenizer, or `calibration_ids`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    checked_model_folder(model_dir, tokenizer=False)
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise MoeInputError(f"transformers cannot read {model_dir / 'config.json'}: {error}") from None
    _config_expert_field(config)
    check_output_dir(out_dir, overwrite, [model_dir])
    if (calibration_text is None) == (calibration_ids is None):
        raise MoeInputError("pass exactly one of calibration_text (a local text file) and calibration_ids")
    if max_tokens < 1 or seq_len < 1:
        raise MoeInputError(f"--max-tokens (max_tokens) and --seq-len (seq_len) must be >= 1, got {max_tokens} "
                            f"and {seq_len}")
    if calibration_ids is None:
        calibration_ids = tokenize_calibration(model_dir, calibration_text, max_tokens, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", use_safetensors=True, local_files_only=True)
    compress_moe_model(model, num_experts, calibration_ids)
    with atomic_output_dir(out_dir, overwrite, [model_dir]) as staging:
        model.save_pretrained(staging)
        copy_tokenizer_files(model_dir, staging)
    return Path(out_dir)
