"""Greedy text generation from a checkpoint, optionally with the fast MoE blocks patched in.

`moefuse generate MODEL --prompt ...` calls `generate` below.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Union

import torch

from moefuse.device import resolve_device
from moefuse.errors import MoeInputError
from moefuse.io.local_files import checked_model_folder
from moefuse.ops.merge import DTYPE_NAMES

def generate(
    model_path: Union[str, Path],
    prompt: str,
    *,
    max_new_tokens: int = 32,
    fast: Optional[bool] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
) -> str:
    """Load `model_path` (a local folder with config, weights and tokenizer) and return the greedy
    continuation of `prompt` (new text only).

    `fast`: True patches the model's sparse MoE blocks with `moefuse.apply_to` (an error if it has
    none); None (the default) patches them where there are any and otherwise runs the model as it
    is, saying so on stderr; False never patches. `dtype` is "float32", "bfloat16" or "float16"
    (default: the checkpoint's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moefuse.integrations.transformers import apply_to

    if dtype is not None and dtype not in DTYPE_NAMES:
        raise MoeInputError(f"generate: dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MoeInputError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    target = resolve_device(device)
    folder = Path(model_path)
    checked_model_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        raise MoeInputError(f"generate: the prompt {prompt!r} encodes to no tokens; give a non-empty prompt")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE_NAMES[dtype] if dtype else "auto",
                                                 use_safetensors=True, local_files_only=True).to(target)
    model.eval()
    if fast is not False:
        try:
            apply_to(model)
        except MoeInputError as error:
            if fast:
                raise
            print(f"moefuse: running the model unpatched: {error}", file=sys.stderr)
    inputs = inputs.to(target)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
