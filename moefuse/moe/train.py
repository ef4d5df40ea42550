"""Fine-tuning of a heterogeneous MoE (`moefuse_hetero`, MergeME) on a local text file.

Minimizes  L = LM cross-entropy + aux_loss_coef * sequence load-balancing loss
(`sequence_load_balancing_loss`: E * sum_e f_e P_e over the batch's sequences) with the learned
router, updating the router and the projectors by default (`train="projectors"`), only the router
(`"router"`) or every parameter (`"all"`). Samples are the text file's non-empty lines, each cut
into pieces of at most `seq_len` tokens (one routing decision per piece); a batch is right-padded
and the padding masked. A perplexity-routed model is trained, and saved, with `routing: learned`.
With K = 1 expert per sequence the LM loss gives the router no gradient (softmax over one logit),
only the load-balancing loss does: use K >= 2 to learn routing from the LM loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

import torch

from moefuse.io.local_files import read_text_file
from moefuse.moe.fine_tuning import (
    TrainingError, TrainResult, load_for_training, mark_trainable, run_adamw, save_trained,
)
from moefuse.moe.modeling_hetero import MoefuseHeteroForCausalLM, sequence_load_balancing_loss

TRAINABLE = {
    "router": ("model.router.",),
    "projectors": ("model.router.", "model.projectors_in.", "model.projectors_out."),
    "all": ("",),
}


def text_samples(text_file: Path, tokenizer, seq_len: int) -> List[List[int]]:
    """The token ids of each non-empty line of `text_file`, cut into pieces of <= seq_len tokens
    (pieces shorter than 2 tokens, which have no next-token target, are dropped)."""
    samples = []
    for line in read_text_file(text_file, "training text").splitlines():
        ids = tokenizer(line, add_special_tokens=False)["input_ids"] if line.strip() else []
        samples.extend(piece for start in range(0, len(ids), seq_len) if len(piece := ids[start:start + seq_len]) >= 2)
    if not samples:
        raise TrainingError(f"training text {text_file} has no line of 2 or more tokens; use a longer text")
    return samples


def _batch(samples: List[List[int]], pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 on padding) of `samples`."""
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample)] = torch.tensor(sample)
        mask[row, : len(sample)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def train_moe(model_dir: Union[str, os.PathLike], text_file: Union[str, os.PathLike],
              out_dir: Union[str, os.PathLike], *, steps: int = 100, learning_rate: float = 1e-3,
              seq_len: int = 128, batch_size: int = 4, train: str = "projectors",
              aux_loss_coef: Optional[float] = None, device: str = "cpu", seed: int = 0,
              progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Fine-tune the heterogeneous MoE in `model_dir` on `text_file` (see the module docstring) for
    `steps` AdamW steps of `batch_size` random samples; save it to `out_dir` atomically, with the
    tokenizer. `aux_loss_coef` defaults to the config's `router_aux_loss_coef`. Training runs in
    fp32 on `device` and is saved in the model's dtype. Returns the per-step total and
    load-balancing losses."""
    tokenizer, model, saved_dtype = load_for_training(model_dir, out_dir, steps=steps, batch_size=batch_size,
                                                      seq_len=seq_len, learning_rate=learning_rate,
                                                      aux_loss_coef=aux_loss_coef, device=device,
                                                      overwrite=overwrite)
    if not isinstance(model, MoefuseHeteroForCausalLM):
        raise TrainingError(f"{Path(model_dir)} ({type(model).__name__}) is not a heterogeneous MoE (moefuse_hetero); "
                            "build one with mode: heterogeneous, or use train-router for token-routed MoEs")
    samples = text_samples(Path(text_file), tokenizer, seq_len)
    coef = model.config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.config.routing = "learned"
    model.to(device).train()
    result = TrainResult(Path(out_dir), trained_parameters=mark_trainable(model, train, TRAINABLE, str.startswith))
    k = model.config.num_experts_per_tok

    def step_losses(generator: torch.Generator):
        chosen = torch.randint(len(samples), (batch_size,), generator=generator).tolist()
        ids, mask, labels = (t.to(device) for t in _batch([samples[i] for i in chosen], pad_id))
        output = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        balance = sequence_load_balancing_loss(output.router_logits, k)
        return output.loss + coef * balance, balance

    run_adamw(model, step_losses, result, steps=steps, learning_rate=learning_rate, seed=seed, progress=progress,
              desc="training the MoE")
    save_trained(model, tokenizer, out_dir, saved_dtype, overwrite, model_dir)
    return result
