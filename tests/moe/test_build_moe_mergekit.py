"""Parity with mergekit-moe (installed as the `mergekit` extra) on tiny models: the same config
gives the same tensors; `hidden` gates agree within mergekit's bf16 hidden-state computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from moefuse import build_moe
from tests.helpers import require_peer
from tests.moe.tiny_models import save_dense_models

PROMPTS = [["python code function return"], ["the king and the queen castle"], ["two plus three equals five"]]
NEGATIVE = ["the night"]


def _mergekit_moe(config: dict, out: Path, seed: int = 0) -> None:
    require_peer("mergekit")
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    torch.manual_seed(seed)  # mergekit-moe's random gates use torch's global generator
    build(MoEMergeConfig.model_validate(config), str(out), MergeOptions(device="cpu", quiet=True),
          device="cpu", allow_all_same=True)


def _state(folder: Path) -> dict:
    """The loaded model's tensors (transformers converts both checkpoint layouts on load)."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_dense_models(tmp_path_factory.mktemp("dense"), "llama", count=3, noise=0.05)


def _config(models, gate_mode: str) -> dict:
    experts = [{"source_model": str(f), "positive_prompts": PROMPTS[i], **({"negative_prompts": NEGATIVE} if i == 1 else {})}
               for i, f in enumerate(models)]
    return {"base_model": str(models[0]), "gate_mode": gate_mode, "experts_per_token": 2, "experts": experts}


@pytest.mark.parametrize("gate_mode", ["random", "uniform_random", "cheap_embed", "hidden"])
def test_same_tensors_as_mergekit_moe(models, tmp_path, gate_mode):
    config = _config(models, gate_mode)
    _mergekit_moe(config, tmp_path / "mergekit", seed=0)
    build_moe({**config, "seed": 0}, tmp_path / "moefuse", progress=False)
    theirs, ours = _state(tmp_path / "mergekit"), _state(tmp_path / "moefuse")
    assert sorted(theirs) == sorted(ours)
    for key, expected in theirs.items():
        if ".gate.weight" in key and gate_mode == "hidden":
            # mergekit runs the base model in bf16; moefuse computes hidden states in fp32.
            cosine = torch.nn.functional.cosine_similarity(ours[key].double(), expected.double(), dim=1)
            assert cosine.min() > 0.995, (key, cosine)
            torch.testing.assert_close(ours[key], expected, atol=0.05, rtol=0)
        else:
            torch.testing.assert_close(ours[key], expected, atol=1e-6, rtol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("architecture,gate_mode", [("qwen3", "random"), ("qwen2", "cheap_embed")])
def test_same_tensors_as_mergekit_moe_qwen_layouts(tmp_path, architecture, gate_mode):
    models = save_dense_models(tmp_path, architecture, count=3, noise=0.05)
    config = _config(models[:2], gate_mode)
    if architecture == "qwen2":  # Qwen MoE: exactly one shared expert, with prompts
        # (mergekit-moe 0.1.5 opens only the base and routed experts, so the shared one is the base)
        config["shared_experts"] = [{"source_model": str(models[0]), "positive_prompts": PROMPTS[2]}]
    _mergekit_moe(config, tmp_path / "mergekit", seed=3)
    build_moe({**config, "seed": 3}, tmp_path / "moefuse", progress=False)
    theirs, ours = _state(tmp_path / "mergekit"), _state(tmp_path / "moefuse")
    assert sorted(theirs) == sorted(ours)
    for key, expected in theirs.items():
        torch.testing.assert_close(ours[key], expected, atol=1e-6, rtol=1e-6, msg=lambda m: f"{key}: {m}")
