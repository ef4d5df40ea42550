"""Tiny dense models with a word-level tokenizer, built in code, for MoE building tests."""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.checkpoints import ARCHITECTURES

WORDS = (
    "the a of to and in is it that for on with as was at by be this from or an are not have "
    "code python function return import class def loop list dict string number sum add minus "
    "math plus times equals two three four five six seven eight nine ten story king queen "
    "castle dragon river forest night day sun moon star song poem love war peace bread wine "
    "json key value array object true false null"
).split()
SPECIAL = ["<unk>", "<s>", "</s>"]
VOCAB_SIZE = 128


def word_tokenizer(words: List[str] = WORDS) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `words`, ids in that order after the SPECIAL tokens
    (for models with VOCAB_SIZE rows, so that ids are left for padding)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(words))}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def tiny_dense_config(architecture: str = "llama", tied: bool = False, layers: int = 2, hidden: int = 64):
    config_class, _ = ARCHITECTURES[architecture]
    return config_class(
        hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=64, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )


def save_dense_models(root: Path, architecture: str = "llama", count: int = 3, tied: bool = False,
                      noise: float = 0.05, seed: int = 0, dtype: torch.dtype = torch.float32,
                      layers: int = 2, hidden: int = 64) -> List[Path]:
    """A base and `count - 1` variants (base + `noise` x N(0,1) on every weight), each saved with
    the word tokenizer under `root`; returns the folders, base first. `noise=0` gives copies."""
    if architecture not in ARCHITECTURES:
        ARCHITECTURES["qwen3"] = (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)
    _, model_class = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    model = model_class(tiny_dense_config(architecture, tied, layers, hidden)).to(dtype).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = word_tokenizer()
    folders = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed * 100 + index)
        state = {
            k: v if index == 0 else (v.float() + noise * torch.randn(v.shape, generator=generator)).to(dtype)
            for k, v in base_state.items()
        }
        model.load_state_dict(state)
        folder = root / f"{architecture}-{index}"
        model.save_pretrained(folder, max_shard_size="100KB")
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders
