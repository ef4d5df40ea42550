"""Tiny Hugging Face checkpoints built in code (no downloads) for checkpoint-level tests."""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
import transformers

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def tiny_config(architecture: str = "llama", tied: bool = False, layers: int = 2):
    config_class, _ = ARCHITECTURES[architecture]
    return config_class(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tied,
    )


def save_variants(root: Path, architecture: str = "llama", count: int = 3, tied: bool = False,
                  dtype: torch.dtype = torch.float32, shard_size: str = "40KB", seed: int = 0,
                  layers: int = 2) -> List[Path]:
    """A base checkpoint and `count - 1` fine-tune-like variants (base + small noise), saved as
    sharded safetensors under `root`; returns their folders, base first."""
    _, model_class = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    model = model_class(tiny_config(architecture, tied, layers)).to(dtype)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    folders = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed * 100 + index)
        state = {
            k: v if index == 0 else (v.float() + 0.02 * torch.randn(v.shape, generator=generator)).to(dtype)
            for k, v in base_state.items()
        }
        model.load_state_dict(state)
        folder = root / f"{architecture}-{index}"
        model.save_pretrained(folder, max_shard_size=shard_size)
        folders.append(folder)
    return folders
