"""Training a heterogeneous MoE (`moefuse train`): two tiny experts of different families, widths and
depths, each first trained on its own synthetic domain; fine-tuning the router and projectors on
both domains lowers the loss and teaches the router to send each domain to its expert."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from moefuse import build_hetero_moe
from moefuse.errors import MoefuseError
from moefuse.moe.train import text_samples, train_moe
from tests.moe.helpers import torch_threads
from tests.moe.tiny_models import WORDS, save_dense_models, word_tokenizer

DOMAINS = (WORDS[WORDS.index("code"):WORDS.index("story")], WORDS[WORDS.index("story"):WORDS.index("json")])
STEPS = 200


def domain_lines(domain: int, count: int, seed: int) -> list:
    """Lines of 12 words: a random walk over the domain's words (each word mostly followed by the next)."""
    rng = random.Random(seed)
    words = DOMAINS[domain]
    lines = []
    for _ in range(count):
        i = rng.randrange(len(words))
        line = []
        for _ in range(12):
            line.append(words[i])
            i = (i + (1 if rng.random() < 0.8 else rng.randrange(len(words)))) % len(words)
        lines.append(" ".join(line))
    return lines


def specialize(folder, lines, steps: int = 60) -> None:
    """Train the dense model in `folder` on `lines` (it becomes that domain's expert) and save it back."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = word_tokenizer()(lines, add_special_tokens=False, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = ids[torch.randint(len(ids), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder, max_shard_size="100KB")  # as save_dense_models wrote it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (measured here: 10 ms vs 0.5 s per training step on a
    busy 2-core machine); the setting is restored afterwards."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(MoE folder, training text, held-out lines per domain): a llama expert (hidden 64, 2 layers) for
    domain 0 and a qwen2 expert (hidden 96, 3 layers) for domain 1, mixed with K = 2 and averaged tables."""
    root = tmp_path_factory.mktemp("hetero-train")
    llama = save_dense_models(root, "llama", count=1, seed=1)[0]
    qwen2 = save_dense_models(root, "qwen2", count=1, seed=2, hidden=96, layers=3)[0]
    specialize(llama, domain_lines(0, 64, seed=3))
    specialize(qwen2, domain_lines(1, 64, seed=4))
    moe = build_hetero_moe({"mode": "heterogeneous", "experts": [str(llama), str(qwen2)], "experts_per_token": 2},
                           root / "moe", progress=False)
    mixed = [line for pair in zip(domain_lines(0, 100, seed=5), domain_lines(1, 100, seed=6)) for line in pair]
    text = root / "train.txt"
    text.write_text("\n".join(mixed) + "\n")
    held_out = [domain_lines(0, 20, seed=7), domain_lines(1, 20, seed=8)]
    return moe, text, held_out


def evaluate(folder, held_out):
    """(LM loss over all held-out lines, routing accuracy: the share of lines whose largest routing
    weight is their domain's expert)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = word_tokenizer()
    losses, correct, total = [], 0, 0
    with torch.no_grad():
        for domain, lines in enumerate(held_out):
            ids = tokenizer(lines, add_special_tokens=False, return_tensors="pt").input_ids
            output = model(input_ids=ids, labels=ids, use_cache=False)
            losses.append(output.loss.item())
            correct += (output.routing_weights.argmax(dim=1) == domain).sum().item()
            total += len(lines)
    return sum(losses) / len(losses), correct / total


@pytest.mark.parametrize("train, learning_rate, trained", [
    ("router", 1e-2, {"router"}),
    ("projectors", 3e-3, {"router", "projectors_in", "projectors_out"}),
])
def test_training_lowers_the_loss_and_routes_each_domain_to_its_expert(pair, tmp_path, train, learning_rate, trained):
    folder, text, held_out = pair
    result = train_moe(folder, text, tmp_path / "trained", steps=STEPS, seq_len=16, batch_size=16, train=train,
                       learning_rate=learning_rate, aux_loss_coef=0.01, progress=False)
    loss_before, accuracy_before = evaluate(folder, held_out)
    loss_after, accuracy_after = evaluate(tmp_path / "trained", held_out)
    print(f"\nheterogeneous MoE, train={train}, {STEPS} steps: held-out loss {loss_before:.3f} -> {loss_after:.3f}, "
          f"routing accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}, "
          f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, {result.trained_parameters} parameters")
    assert len(result.losses) == len(result.balance_losses) == STEPS
    assert loss_after < loss_before - 1.0
    assert accuracy_after >= 0.9
    before = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained").state_dict()
    assert {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])} == trained
    assert (tmp_path / "trained" / "tokenizer.json").exists()


def test_text_samples_are_lines_cut_to_the_sequence_length(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the king and the queen\n\nsun\ncode python function return import class def\n")
    samples = text_samples(text, word_tokenizer(), seq_len=3)
    assert [len(s) for s in samples] == [3, 2, 3, 3]  # "sun" alone and the 1-token tail of line 3 are dropped


def test_training_errors(pair, tmp_path):
    folder, text, _ = pair
    with pytest.raises(MoefuseError, match="does not exist"):
        train_moe(folder, tmp_path / "missing.txt", tmp_path / "out", steps=1, progress=False)
    with pytest.raises(MoefuseError, match="train='everything'"):
        train_moe(folder, text, tmp_path / "out", steps=1, train="everything", progress=False)
    dense = save_dense_models(tmp_path, "llama", count=1)[0]
    with pytest.raises(MoefuseError, match="not a heterogeneous MoE"):
        train_moe(dense, text, tmp_path / "out", steps=1, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(MoefuseError, match=f"output folder {folder.parent} holds the input {folder}"):
        train_moe(folder, text, folder.parent, steps=1, overwrite=True, progress=False)
    assert folder.is_dir()


def test_cli(pair, tmp_path, capsys):
    from moefuse.cli import main

    folder, text, _ = pair
    assert main(["train", str(folder), str(text), str(tmp_path / "out"), "--steps", "2", "--seq-len", "8",
                 "--train", "all"]) == 0
    assert "parameters trained" in capsys.readouterr().out
    assert main(["train", str(folder), str(tmp_path / "none.txt"), str(tmp_path / "x"), "--quiet"]) == 2
