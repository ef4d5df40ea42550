"""Helpers shared by the tests of the sequence-routed MoE model classes (`moefuse_moe`,
`moefuse_hetero`): torch's thread count for a block, greedy generation, and the check that a
left-padded batch generates and routes as its prompts do alone."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads; the previous count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def greedy(model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    """The 6 tokens `model` generates greedily after `input_ids` (no end-of-sequence stop)."""
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None, **kwargs)
    return out[:, input_ids.shape[1]:]


def assert_left_padded_batch_matches_alone(model, prompts: Sequence[torch.Tensor]) -> None:
    """Left-pad `prompts` (1-D token ids) to one batch; each row must generate the same tokens as
    its prompt alone, and get the same routing weights."""
    length = max(len(prompt) for prompt in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, -len(prompt):] = prompt
        mask[row, -len(prompt):] = 1
    batched = greedy(model, ids, mask)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], greedy(model, prompt[None])[0]), row
        torch.testing.assert_close(model.route(ids, mask)[row], model.route(prompt[None])[0], rtol=1e-5, atol=1e-6)
