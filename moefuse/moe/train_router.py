"""Short router fine-tuning of a token-routed MoE (Mixtral, Qwen2-MoE, Qwen3-MoE layouts).

Minimizes  L = LM cross-entropy + aux_loss_coef * load-balancing loss  (the Switch/Mixtral loss
E * sum_e f_e * P_e, with f_e the fraction of token slots routed to expert e and P_e the mean
router probability of e, as transformers computes it with `output_router_logits=True`) over
random windows of a local text file, updating only the routers by default (`train="gates"`),
or also the experts' FFNs (`"experts"`) or every parameter (`"all"`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Union

import torch
import transformers
from tqdm import tqdm

from moefuse.errors import MoefuseError
from moefuse.io.output import atomic_output_dir

TRAINABLE = {
    "gates": (".gate.weight", "shared_expert_gate.weight"),
    "experts": (".gate.weight", "shared_expert_gate.weight", ".experts.", ".shared_expert."),
    "all": ("",),
}


class TrainingError(MoefuseError, ValueError):
    """Router training cannot run with these inputs."""


@dataclass
class TrainResult:
    out_dir: Path
    losses: List[float] = field(default_factory=list)  # total loss per step
    balance_losses: List[float] = field(default_factory=list)  # load-balancing loss per step
    trained_parameters: int = 0


def _token_windows(text_file: Path, tokenizer, length: int) -> torch.Tensor:
    path = Path(text_file)
    if not path.is_file():
        raise TrainingError(f"training text {path} does not exist; pass a local UTF-8 text file")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < length + 1:
        raise TrainingError(f"training text {path} has {len(ids)} tokens, fewer than one window of {length + 1}; "
                            "use a longer text or a smaller --seq-len")
    count = len(ids) // length
    return torch.tensor(ids[: count * length], dtype=torch.long).reshape(count, length)


def _mark_trainable(model: torch.nn.Module, train: str) -> int:
    if train not in TRAINABLE:
        raise TrainingError(f"train='{train}' is not supported; use one of {', '.join(TRAINABLE)}")
    patterns = TRAINABLE[train]
    count = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(p in name for p in patterns))
        count += parameter.numel() if parameter.requires_grad else 0
    if count == 0:
        raise TrainingError(f"the model ({type(model).__name__}) has no router parameters to train; "
                            "router training needs a token-routed MoE (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    return count


def train_router(model_dir: Union[str, os.PathLike], text_file: Union[str, os.PathLike],
                 out_dir: Union[str, os.PathLike], *, steps: int = 100, learning_rate: float = 1e-3,
                 seq_len: int = 128, batch_size: int = 4, train: str = "gates", aux_loss_coef: float = 0.02,
                 device: str = "cpu", seed: int = 0, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Fine-tune the routers of the MoE in `model_dir` on `text_file`; save the result to `out_dir`
    (atomically, with the tokenizer). Training runs in fp32 and is saved in the model's dtype."""
    if steps < 1 or batch_size < 1 or seq_len < 2 or learning_rate <= 0:
        raise TrainingError("steps and batch_size must be >= 1, seq_len >= 2 and learning_rate > 0")
    model_dir = Path(model_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot load the model and tokenizer from {model_dir}: {error}") from None
    saved_dtype = getattr(model.config, "dtype", None) or torch.float32
    if not hasattr(model.config, "router_aux_loss_coef"):
        raise TrainingError(f"{model_dir} ({type(model).__name__}) is not a token-routed MoE with a load-balancing loss; "
                            "router training supports Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints")
    windows = _token_windows(Path(text_file), tokenizer, seq_len)
    model.config.router_aux_loss_coef = aux_loss_coef
    model.to(device).train()
    result = TrainResult(Path(out_dir), trained_parameters=_mark_trainable(model, train))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="training routers", disable=not progress):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)].to(device)
        output = model(input_ids=batch, labels=batch, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        result.losses.append(output.loss.item())
        result.balance_losses.append(output.aux_loss.item())
    model.eval()
    with atomic_output_dir(out_dir, overwrite) as partial:
        model.to("cpu", dtype=saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.float32)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return result
