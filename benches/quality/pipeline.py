"""The quality evaluation: domain experts from one base, merged and MoE models, held-out losses.

Steps (every random choice seeded):
 1. corpora and a BPE tokenizer (benches/quality/data.py);
 2. a small Llama base trained from scratch on all domains' training splits;
 3. one expert per domain: the base fine-tuned on that domain;
 4. merged models with moefuse (average, task arithmetic, TIES, DARE-TIES) and the same configs with
    mergekit; MoEs with `moefuse build-moe` (Mixtral with random and hidden routers, MergeME's
    perplexity routing with merged or separate attention) and the hidden-router MoE after a short
    router fine-tune; a heterogeneous MoE of the python expert and a narrower, shallower model
    fine-tuned on arithmetic, before and after a short router/projector fine-tune;
 5. each model's mean next-token loss (and perplexity) on every domain's held-out split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import transformers

from benches.quality.data import DOMAINS, corpora, train_tokenizer
from moefuse import build_moe, merge_checkpoints
from moefuse.moe.train import train_moe
from moefuse.moe.train_router import train_router


@dataclass(frozen=True)
class Scale:
    """Sizes and step counts of one run."""

    chars: int = 400_000          # training characters per domain
    vocab: int = 2048
    hidden: int = 192
    intermediate: int = 512
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    batch: int = 8
    base_steps: int = 400
    expert_steps: int = 150
    router_steps: int = 60
    eval_windows: int = 48         # held-out windows per domain


FULL = Scale()
SMOKE = Scale(chars=20_000, vocab=400, hidden=32, intermediate=64, layers=2, heads=2, seq_len=32, batch=4,
              base_steps=6, expert_steps=3, router_steps=2, eval_windows=3)

SHARED_TIES = [{"method": "ties", "parameters": {"density": 0.5, "weight": 1.0}}]
MERGES = {
    "average": {"merge_method": "linear", "parameters": {"weight": 1.0}},
    # lambda 1 (the default): the runs so far set lambda 0.5 under each model, where both tools ignore it
    "task arithmetic": {"merge_method": "task_arithmetic", "parameters": {"weight": 1.0}},
    "TIES": {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}},
    "DARE-TIES": {"merge_method": "dare_ties", "parameters": {"weight": 1.0, "density": 0.5}},
}


@dataclass
class Run:
    root: Path
    scale: Scale
    seed: int
    log: Callable[[str], None] = print
    tokenizer: Optional[transformers.PreTrainedTokenizerFast] = None
    train_ids: Dict[str, torch.Tensor] = field(default_factory=dict)
    held_out_ids: Dict[str, torch.Tensor] = field(default_factory=dict)
    losses: Dict[str, Dict[str, float]] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)

    # ---- data and training ----------------------------------------------------------------
    def prepare(self) -> None:
        texts = corpora(self.scale.chars, self.seed)
        self.tokenizer = train_tokenizer([c.train for c in texts.values()], self.scale.vocab)
        for domain, corpus in texts.items():
            self.train_ids[domain] = self._ids(corpus.train)
            self.held_out_ids[domain] = self._ids(corpus.held_out)[: self.scale.eval_windows]
        (self.root / "train_mixed.txt").write_text("\n".join(c.train for c in texts.values()))
        self.prompts = {d: [line for line in c.train.splitlines() if line.strip()][:3] for d, c in texts.items()}

    def _ids(self, text: str) -> torch.Tensor:
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        windows = len(ids) // self.scale.seq_len
        return ids[: windows * self.scale.seq_len].reshape(windows, self.scale.seq_len)

    def _train(self, model, windows: torch.Tensor, steps: int, lr: float, seed: int) -> List[float]:
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
        model.train()
        losses = []
        for _ in range(steps):
            batch = windows[torch.randint(len(windows), (self.scale.batch,), generator=generator)]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        return losses

    def _trained(self, name: str, make_model: Callable[[], transformers.PreTrainedModel], windows: torch.Tensor,
                 steps: int, lr: float, seed: int) -> Path:
        """Train `make_model()` and save it as `name` under the work folder, unless a model of that
        name is already there (a rerun with the same --work folder, seed and scale reuses it)."""
        folder = self.root / name
        if (folder / "config.json").exists():
            self.log(f"{name}: reusing {folder}")
            return folder
        model = make_model()
        self._timed(f"train {name}", lambda: self._train(model, windows, steps, lr, seed))
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return folder

    def _fresh(self, hidden: int, intermediate: int, layers: int) -> Callable[[], transformers.PreTrainedModel]:
        """A constructor of a seeded, randomly initialized Llama of this shape."""
        config = transformers.LlamaConfig(
            vocab_size=len(self.tokenizer), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=self.scale.heads, num_key_value_heads=self.scale.heads,
            max_position_embeddings=self.scale.seq_len, bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id, tie_word_embeddings=False)

        def fresh():
            torch.manual_seed(self.seed)
            return transformers.LlamaForCausalLM(config)
        return fresh

    def train_base_and_experts(self) -> None:
        s = self.scale
        mixed = torch.cat([self.train_ids[d] for d in DOMAINS])
        self.base = self._trained("base", self._fresh(s.hidden, s.intermediate, s.layers), mixed, s.base_steps,
                                  1e-3, self.seed)
        self.experts = {
            domain: self._trained(f"expert-{domain}", lambda: transformers.AutoModelForCausalLM.from_pretrained(self.base),
                                  self.train_ids[domain], s.expert_steps, 3e-4, self.seed + 1 + index)
            for index, domain in enumerate(DOMAINS)
        }

    def _timed(self, what: str, fn: Callable[[], object]):
        start = time.perf_counter()
        result = fn()
        self.seconds[what] = time.perf_counter() - start
        self.log(f"{what}: {self.seconds[what]:.1f} s")
        return result

    # ---- merged models and MoEs -------------------------------------------------------------
    def merge_config(self, name: str) -> dict:
        spec = MERGES[name]
        models = [{"model": str(f), "parameters": dict(spec["parameters"])} for f in self.experts.values()]
        config = {"merge_method": spec["merge_method"], "models": models, "dtype": "float32"}
        if spec["merge_method"] != "linear":
            config["base_model"] = str(self.base)
        return config

    def build_merges(self, with_mergekit: bool) -> Dict[str, Path]:
        folders = {}
        for name in MERGES:
            config = self.merge_config(name)
            folders[f"{name} (moefuse)"] = self._timed(
                f"moefuse merge {name}", lambda: merge_checkpoints(config, self.root / f"merge-{name}", progress=False, overwrite=True))
            if with_mergekit:
                folders[f"{name} (mergekit)"] = self._timed(
                    f"mergekit merge {name}", lambda: _mergekit_merge(config, self.root / f"mergekit-{name}"))
        return folders

    def moe_config(self, gate_mode: str, **extra) -> dict:
        experts = [{"source_model": str(f), "positive_prompts": self.prompts[d]} for d, f in self.experts.items()]
        return {"base_model": str(self.base), "gate_mode": gate_mode, "experts_per_token": 2, "seed": self.seed,
                "dtype": "float32", "experts": experts, "shared_weights": SHARED_TIES, **extra}

    def build_moes(self) -> Dict[str, Path]:
        variants = {
            "MoE, random router": self.moe_config("random"),
            "MoE, hidden router": self.moe_config("hidden"),
            "MoE, perplexity routing": self.moe_config("perplexity"),
            "MoE, perplexity routing, separate attention": self.moe_config("perplexity", separate_attention=True),
        }
        folders = {}
        for index, (name, config) in enumerate(variants.items()):
            folders[name] = self._timed(f"build {name}", lambda: build_moe(config, self.root / f"moe-{index}", progress=False, overwrite=True))
        folders["MoE, hidden router, router fine-tuned"] = self._timed("train router", lambda: train_router(
            folders["MoE, hidden router"], self.root / "train_mixed.txt", self.root / "moe-hidden-tuned",
            steps=self.scale.router_steps, seq_len=self.scale.seq_len, batch_size=self.scale.batch,
            learning_rate=1e-2, seed=self.seed, progress=False, overwrite=True).out_dir)
        return folders

    def build_hetero(self) -> Dict[str, Path]:
        """MergeME's heterogeneous MoE of two experts of different widths and depths: the python
        expert and a narrower, shallower Llama (trained from scratch on all domains, then
        fine-tuned on arithmetic), with averaged tables, before and after a short fine-tune of
        the router and projectors."""
        s = self.scale
        hidden = s.hidden * 3 // 4
        mixed = torch.cat([self.train_ids[d] for d in DOMAINS])
        narrow_base = self._trained("narrow-base", self._fresh(hidden, s.intermediate * 3 // 4, s.layers - 1), mixed,
                                    s.base_steps, 1e-3, self.seed)
        narrow = self._trained("narrow-arithmetic", lambda: transformers.AutoModelForCausalLM.from_pretrained(narrow_base),
                               self.train_ids["arithmetic"], s.expert_steps, 3e-4, self.seed + 10)
        config = {"mode": "heterogeneous", "experts": [str(self.experts["python"]), str(narrow)],
                  "experts_per_token": 2, "routing": "learned", "projector": "linear", "seed": self.seed,
                  "dtype": "float32"}
        built = self._timed("build heterogeneous MoE",
                            lambda: build_moe(config, self.root / "hetero", progress=False, overwrite=True))
        tuned = self._timed("train heterogeneous MoE", lambda: train_moe(
            built, self.root / "train_mixed.txt", self.root / "hetero-tuned", steps=2 * s.router_steps,
            learning_rate=1e-3, seq_len=s.seq_len, batch_size=s.batch, seed=self.seed, progress=False,
            overwrite=True).out_dir)
        name = f"heterogeneous MoE (python {s.hidden}-wide + arithmetic {hidden}-wide)"
        return {name: built, f"{name}, router+projectors fine-tuned": tuned}

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, name: str, folder: Path) -> Dict[str, float]:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        losses = {}
        with torch.no_grad():
            for domain in DOMAINS:
                windows = self.held_out_ids[domain]
                losses[domain] = float(model(input_ids=windows, labels=windows).loss)
        losses["average"] = sum(losses[d] for d in DOMAINS) / len(DOMAINS)
        self.losses[name] = losses
        self.log(f"{name}: " + ", ".join(f"{d} {v:.3f}" for d, v in losses.items()))
        return losses

    def run(self, with_mergekit: bool = True) -> dict:
        self._timed("prepare data", self.prepare)
        self.train_base_and_experts()
        models = {"base": self.base, **{f"expert: {d}": f for d, f in self.experts.items()}}
        models.update(self.build_merges(with_mergekit))
        models.update(self.build_moes())
        models.update(self.build_hetero())
        for name, folder in models.items():
            self.evaluate(name, Path(folder))
        return self.summary()

    def summary(self) -> dict:
        experts_win = {d: self.losses[f"expert: {d}"][d] < self.losses["base"][d] for d in DOMAINS}
        parity = {name: abs(self.losses[f"{name} (moefuse)"]["average"] - self.losses[f"{name} (mergekit)"]["average"])
                  for name in MERGES if f"{name} (mergekit)" in self.losses}
        return {
            "seed": self.seed, "scale": self.scale.__dict__, "domains": list(DOMAINS),
            "rows": [{"model": name, **{d: v for d, v in losses.items()},
                      **{f"{d} ppl": math.exp(v) for d, v in losses.items()}} for name, losses in self.losses.items()],
            "checks": {"expert beats base on its domain": experts_win,
                       "moefuse vs mergekit |average loss difference|": parity},
            "seconds": self.seconds,
        }


def _mergekit_merge(config: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(copy_tokenizer=True, quiet=True))
    return out
