"""Greedy text generation from a checkpoint, optionally with the fast MoE blocks patched in.

`moefuse generate MODEL --prompt ...` calls `generate` below.
"""

from __future__ import annotations

from typing import Optional

import torch

from moefuse.errors import MoeInputError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def generate(
    model_path: str,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    fast: bool = True,
    device: str = "cpu",
    dtype: Optional[str] = None,
) -> str:
    """Load `model_path` (a folder with config, weights and tokenizer), patch its sparse MoE blocks
    with `moefuse.apply_to` when `fast`, and return the greedy continuation of `prompt`
    (new text only). `dtype` is "float32", "bfloat16" or "float16" (default: the checkpoint's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moefuse.integrations.transformers import apply_to

    if dtype is not None and dtype not in _DTYPES:
        raise MoeInputError(f"generate: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype] if dtype else "auto").to(device)
    model.eval()
    if fast:
        apply_to(model)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
