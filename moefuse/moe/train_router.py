"""Short router fine-tuning of a token-routed MoE (Mixtral, Qwen2-MoE, Qwen3-MoE layouts).

Minimizes  L = LM cross-entropy + aux_loss_coef * load-balancing loss  (the Switch/Mixtral loss
E * sum_e f_e * P_e, with f_e the fraction of token slots routed to expert e and P_e the mean
router probability of e, as transformers computes it with `output_router_logits=True`) over
random windows of a local text file, updating only the routers by default (`train="gates"`),
or also the experts' FFNs (`"experts"`) or every parameter (`"all"`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from moefuse.io.local_files import read_text_file
from moefuse.moe.fine_tuning import (
    TrainingError, TrainResult, load_for_training, mark_trainable, run_adamw, save_trained,
)

TRAINABLE = {
    "gates": (".gate.weight", "shared_expert_gate.weight"),
    "experts": (".gate.weight", "shared_expert_gate.weight", ".experts.", ".shared_expert."),
    "all": ("",),
}


def _token_windows(text_file: Path, tokenizer, length: int) -> torch.Tensor:
    ids = tokenizer(read_text_file(text_file, "training text"), add_special_tokens=False)["input_ids"]
    if len(ids) < length + 1:
        raise TrainingError(f"training text {text_file} has {len(ids)} tokens, fewer than one window of {length + 1}; "
                            "use a longer text or a smaller --seq-len")
    count = len(ids) // length
    return torch.tensor(ids[: count * length], dtype=torch.long).reshape(count, length)


def _mark_trainable(model: torch.nn.Module, train: str) -> int:
    count = mark_trainable(model, train, TRAINABLE, str.__contains__)
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
    tokenizer, model, saved_dtype = load_for_training(model_dir, out_dir, steps=steps, batch_size=batch_size,
                                                      seq_len=seq_len, learning_rate=learning_rate,
                                                      aux_loss_coef=aux_loss_coef, device=device,
                                                      overwrite=overwrite)
    if not hasattr(model.config, "router_aux_loss_coef"):
        raise TrainingError(f"{Path(model_dir)} ({type(model).__name__}) is not a token-routed MoE with a "
                            "load-balancing loss; router training supports Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints")
    windows = _token_windows(Path(text_file), tokenizer, seq_len)
    checkpoint_coef = model.config.router_aux_loss_coef
    model.config.router_aux_loss_coef = aux_loss_coef
    model.to(device).train()
    result = TrainResult(Path(out_dir), trained_parameters=_mark_trainable(model, train))

    def step_losses(generator: torch.Generator):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)].to(device)
        output = model(input_ids=batch, labels=batch, output_router_logits=True)
        return output.loss, output.aux_loss

    run_adamw(model, step_losses, result, steps=steps, learning_rate=learning_rate, seed=seed, progress=progress,
              desc="training routers")
    model.config.router_aux_loss_coef = checkpoint_coef  # a training option, not a property of the model
    save_trained(model, tokenizer, out_dir, saved_dtype, overwrite, model_dir)
    return result
