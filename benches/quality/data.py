"""Offline domain corpora and a BPE tokenizer for the quality evaluation.

Four domains, each with a held-out split that training never sees:
    python      source files of the Python standard library (every 10th file held out)
    prose       the English documentation topics shipped with Python (`pydoc_data.topics`)
    arithmetic  generated lines such as "417 + 86 = 503" (held out: another seed)
    json        generated JSON records (held out: another seed)
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DOMAINS = ("python", "prose", "arithmetic", "json")
HELD_OUT_EVERY = 10
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass
class Corpus:
    train: str
    held_out: str


def _python(chars: int) -> Corpus:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = [], []
    for index, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if index % HELD_OUT_EVERY == 0 else train).append(text)
    return Corpus("\n".join(train)[:chars], "\n".join(held)[: chars // 4])


def _prose(chars: int) -> Corpus:
    from pydoc_data.topics import topics

    train, held = [], []
    for index, key in enumerate(sorted(topics)):
        (held if index % HELD_OUT_EVERY == 0 else train).append(topics[key])
    return Corpus("\n".join(train)[:chars], "\n".join(held)[: chars // 4])


def _arithmetic_lines(seed: int, chars: int) -> str:
    rng = random.Random(seed)
    lines, size = [], 0
    while size < chars:
        a, b = rng.randrange(1000), rng.randrange(1000)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        line = f"{a} {op} {b} = {value}"
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _json_lines(seed: int, chars: int) -> str:
    rng = random.Random(seed)
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    cities = ["Paris", "Berlin", "Tokyo", "Lima", "Cairo", "Oslo", "Quito", "Delhi"]
    lines, size = [], 0
    while size < chars:
        record = {"id": rng.randrange(10**5), "name": rng.choice(names), "age": rng.randrange(18, 90),
                  "city": rng.choice(cities), "active": rng.random() < 0.5,
                  "scores": [rng.randrange(100) for _ in range(rng.randrange(1, 4))]}
        line = json.dumps(record)
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def corpora(chars: int, seed: int) -> Dict[str, Corpus]:
    """Each domain's training text (about `chars` characters) and held-out text (a quarter)."""
    return {
        "python": _python(chars),
        "prose": _prose(chars),
        "arithmetic": Corpus(_arithmetic_lines(seed, chars), _arithmetic_lines(seed + 10_000, chars // 4)),
        "json": Corpus(_json_lines(seed, chars), _json_lines(seed + 10_000, chars // 4)),
    }


def train_tokenizer(texts: List[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the training splits only."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
