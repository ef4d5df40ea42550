"""The steps every MoE fine-tuning shares (`train_router` for token-routed MoEs, `train_moe` for
heterogeneous ones): check the options, load the model in fp32 with its tokenizer, run AdamW on
the trainable parameters minimizing  L = LM loss + coef * load-balancing loss, and save the result
atomically in the model's own dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Mapping, Tuple, Union

import torch
import transformers
from tqdm import tqdm

from moefuse.errors import MoefuseError
from moefuse.device import resolve_device
from moefuse.io.output import atomic_output_dir, check_output_dir

StepLosses = Callable[[torch.Generator], Tuple[torch.Tensor, torch.Tensor]]


class TrainingError(MoefuseError, ValueError):
    """MoE fine-tuning (of routers, or of a heterogeneous MoE) cannot run with these inputs."""


@dataclass
class TrainResult:
    out_dir: Path
    losses: List[float] = field(default_factory=list)  # total loss per step
    balance_losses: List[float] = field(default_factory=list)  # load-balancing loss per step
    trained_parameters: int = 0


def load_for_training(model_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], *, steps: int,
                      batch_size: int, seq_len: int, learning_rate: float, device: str, overwrite: bool):
    """(tokenizer, model in fp32, the dtype to save it in: its config's, else fp32) of `model_dir`,
    after checking steps, batch_size >= 1, seq_len >= 2, learning_rate > 0, the device, and that
    `out_dir` may be written (see `check_output_dir`), so that no training is wasted."""
    if steps < 1 or batch_size < 1 or seq_len < 2 or learning_rate <= 0:
        raise TrainingError("steps and batch_size must be >= 1, seq_len >= 2 and learning_rate > 0")
    resolve_device(device)
    check_output_dir(out_dir, overwrite, [model_dir])
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot load the model and tokenizer from {Path(model_dir)}: {error}") from None
    dtype = getattr(model.config, "dtype", None)
    return tokenizer, model, dtype if isinstance(dtype, torch.dtype) else torch.float32


def read_training_text(text_file: Union[str, os.PathLike]) -> str:
    """The UTF-8 text of `text_file`; a missing file raises naming it."""
    path = Path(text_file)
    if not path.is_file():
        raise TrainingError(f"training text {path} does not exist; pass a local UTF-8 text file")
    return path.read_text(encoding="utf-8")


def mark_trainable(model: torch.nn.Module, train: str, choices: Mapping[str, Tuple[str, ...]],
                   match: Callable[[str, str], bool]) -> int:
    """Let only the parameters whose name `match`es one of the patterns of `choices[train]` require
    grad; returns how many entries they hold. An unknown `train` lists the choices."""
    if train not in choices:
        raise TrainingError(f"train='{train}' is not supported; use one of {', '.join(choices)}")
    count = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(match(name, pattern) for pattern in choices[train]))
        count += parameter.numel() if parameter.requires_grad else 0
    return count


def run_adamw(model: torch.nn.Module, step_losses: StepLosses, result: TrainResult, *, steps: int,
              learning_rate: float, seed: int, progress: bool, desc: str) -> None:
    """`steps` AdamW steps (learning rate `learning_rate`) over the parameters that require grad;
    each minimizes the total loss L of `step_losses(generator)` -> (L, load-balancing loss), the
    generator seeded with `seed` choosing the batch. Both losses are appended to `result` per
    step; the model is left in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        loss, balance = step_losses(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
        result.balance_losses.append(balance.item())
    model.eval()


def save_trained(model, tokenizer, out_dir: Union[str, os.PathLike], dtype: torch.dtype, overwrite: bool,
                 model_dir: Union[str, os.PathLike]) -> None:
    """Write `model` (moved to the CPU in `dtype`) and `tokenizer` into `out_dir` atomically
    (never over its input folder `model_dir`)."""
    with atomic_output_dir(out_dir, overwrite, [model_dir]) as partial:
        model.to("cpu", dtype=dtype)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
