"""Tiny dense models and `moefuse_moe` checkpoints written straight from their state dicts, in the
format the MoE builder writes (config.json + model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
FAMILIES = {
    "llama": lambda **kw: LlamaConfig(**TINY, **kw),
    "mistral": lambda **kw: MistralConfig(**TINY, sliding_window=6, **kw),
    "qwen2": lambda **kw: Qwen2Config(**TINY, **kw),
    # layer 0 full attention, layer 1 a 4-token sliding window
    "qwen2_sliding": lambda **kw: Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1, **kw
    ),
    "qwen3": lambda **kw: Qwen3Config(**TINY, head_dim=16, **kw),
}
ATTENTION_PREFIXES = ("self_attn.", "input_layernorm.", "post_attention_layernorm.")


def dense_model(family: str, seed: int, tie_word_embeddings: bool = False, initializer_range: float = 0.02):
    """A randomly initialized tiny dense causal LM of `family` (fp32, eval mode); a large
    `initializer_range` gives peaked next-token distributions (a model with opinions)."""
    torch.manual_seed(seed)
    config = FAMILIES[family](tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def noised(model, scale: float, seed: int):
    """A copy of `model` with Gaussian noise of std `scale` * (the tensor's std) added to every tensor."""
    generator = torch.Generator().manual_seed(seed)
    copy = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
    state = {}
    for key, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator) * scale * tensor.float().std().clamp(min=1e-3)
        state[key] = tensor + noise
    copy.load_state_dict(state)
    return copy


def moe_state_dict(experts: Sequence, separate_attention: bool, shared_from: int = 0) -> Dict[str, torch.Tensor]:
    """moefuse_moe tensors: embed/norm/head (and shared attention) from expert `shared_from`."""
    states = [model.state_dict() for model in experts]
    shared = states[shared_from]
    out = {}
    for key, tensor in shared.items():
        if not key.startswith("model.layers."):
            out[key] = tensor
            continue
        layer, rest = key[len("model.layers.") :].split(".", 1)
        if separate_attention:
            for e, state in enumerate(states):
                out[f"model.layers.{layer}.experts.{e}.{rest}"] = state[key]
        elif rest.startswith(ATTENTION_PREFIXES):
            out[key] = tensor
        else:
            for e, state in enumerate(states):
                out[f"model.layers.{layer}.mlp.experts.{e}.{rest[len('mlp.'):]}"] = state[key]
    if experts[shared_from].config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def write_moe_checkpoint(
    folder: Path,
    experts: Sequence,
    num_experts_per_tok: int,
    separate_attention: bool,
    shared_from: int = 0,
    routing_temperature: float = 1.0,
    routing: str = "perplexity",
    base_config: Optional[dict] = None,
) -> Path:
    """Write a moefuse_moe checkpoint of `experts` (dense models of one family) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    dense = experts[shared_from].config
    config = {
        "model_type": "moefuse_moe",
        "architectures": ["MoefuseMoeForCausalLM"],
        "base_config": base_config if base_config is not None else dense.to_dict(),
        "num_experts": len(experts),
        "num_experts_per_tok": num_experts_per_tok,
        "routing": routing,
        "separate_attention": separate_attention,
        "routing_temperature": routing_temperature,
        "tie_word_embeddings": dense.tie_word_embeddings,
        "dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(moe_state_dict(experts, separate_attention, shared_from), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder
