"""The steps every MoE fine-tuning shares (`train_router` for token-routed MoEs, `train_moe` for
heterogeneous ones): check the options, load the model in fp32 with its tokenizer, run AdamW on
the trainable parameters minimizing  L = LM loss + coef * load-balancing loss, and save the result
atomically in the model's own dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Tuple, Union

import torch
import transformers
from tqdm import tqdm

from moefuse.errors import MoefuseError
from moefuse.device import resolve_device
from moefuse.io.local_files import checked_model_folder
from moefuse.io.output import atomic_output_dir, check_output_dir
from moefuse.merge.config import checkpoint_dtype

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
                      batch_size: int, seq_len: int, learning_rate: float, aux_loss_coef: Optional[float],
                      device: str, overwrite: bool):
    """(tokenizer, model in fp32, the dtype to save it in: its config's, else fp32) of `model_dir`,
    after checking steps, batch_size >= 1, seq_len >= 2, learning_rate > 0, aux_loss_coef >= 0 (when
    given), the device, the model folder (`checked_model_folder`: no hub, no unpickling), and that
    `out_dir` may be written (see `check_output_dir`), so that no training is wasted."""
    if steps < 1 or batch_size < 1 or seq_len < 2 or learning_rate <= 0:
        raise TrainingError("steps and batch_size must be >= 1, seq_len >= 2 and learning_rate > 0")
    if aux_loss_coef is not None and not aux_loss_coef >= 0:
        raise TrainingError(f"--aux-loss-coef (aux_loss_coef) must be >= 0, got {aux_loss_coef}")
    resolve_device(device)
    check_output_dir(out_dir, overwrite, [model_dir])
    saved_dtype = checkpoint_dtype(checked_model_folder(model_dir)) or torch.float32
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                                  use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot load the model and tokenizer from {Path(model_dir)}: {error}") from None
    return tokenizer, model, saved_dtype


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
