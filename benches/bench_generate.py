"""End-to-end generation with a merged MoE: `moefuse.apply_to` vs transformers' own experts
implementations (`grouped_mm`, its default, and `eager`), same checkpoint, same prompts, same run.

The MoE is built by `moefuse.build_moe` from the real SmolLM2-135M (NOTES.md) and perturbed
variants of it: EXPERTS experts, top-2, random gates, a Mixtral checkpoint (hidden 576,
intermediate 1536, 30 layers). Each implementation loads it with AutoModelForCausalLM; per dtype:
  - prefill: one forward pass over a PREFILL-token prompt, batch 1 (ms, tokens/s);
  - decode: greedy `generate` of DECODE new tokens after a short prompt, timed as
    generate(DECODE + 1 tokens) - generate(1 token), i.e. DECODE decoding steps (tokens/s);
  - how many leading greedy tokens equal the peer's (bf16 rounds differently in each
    implementation, so long greedy runs may part; transformers' own implementations part too).
Implementations take turns within every round (the CPU machine is shared); best of rounds.

Run: python -m pytest benches/bench_generate.py (MOEFUSE_BENCH_QUICK=1 for a short smoke run;
MOEFUSE_BENCH_THREADS=N fixes the CPU thread count); python -m benches.bench_generate
benches/results/generate_cpu.json [--plot] prints the Markdown table (and redraws the PNG).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from benches import common, plots
from tests.real_model import variants

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
common.apply_thread_setting()
QUICK = common.quiet_env()
EXPERTS = 4 if QUICK else 8
PREFILL = 32 if QUICK else 256
DECODE = 4 if QUICK else 32
ROUNDS = 2 if QUICK else 5
IMPLEMENTATIONS = ("moefuse", "grouped_mm", "eager")
DTYPES = (torch.bfloat16,) if QUICK or DEVICE == "cuda" else (torch.bfloat16, torch.float32)
ROWS: list = []  # this module's rows, for its own plot (benches/plots.py draws single-peer bars)


_plot_at_the_end = common.plot_at_module_end(ROWS, f"generate_{DEVICE}", lambda *args: plot(*args))


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    import moefuse

    root = tmp_path_factory.mktemp("generate-bench")
    folders = variants(root, EXPERTS)
    config = {"base_model": str(folders[0]), "gate_mode": "random", "experts_per_token": 2, "dtype": "bfloat16",
              "experts": [{"source_model": str(folder)} for folder in folders]}
    out = moefuse.build_moe(config, root / "moe", progress=False)
    for folder in folders:
        shutil.rmtree(folder)
    yield out
    shutil.rmtree(root, ignore_errors=True)


def _load(path, implementation: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from moefuse.integrations.transformers import apply_to

    experts = "grouped_mm" if implementation == "moefuse" else implementation
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=experts).to(DEVICE)
    model.eval()
    if implementation == "moefuse":
        apply_to(model)
    return model


def _seconds(fn) -> float:
    common.synchronize(DEVICE)
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    common.synchronize(DEVICE)
    return time.perf_counter() - start


def _greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_generate_speed(record, moe_checkpoint, dtype):
    models = {name: _load(moe_checkpoint, name, dtype) for name in IMPLEMENTATIONS}
    generator = torch.Generator().manual_seed(0)
    vocab = models["moefuse"].config.vocab_size
    long_prompt = torch.randint(0, vocab, (1, PREFILL), generator=generator).to(DEVICE)
    short_prompt = torch.randint(0, vocab, (1, 16), generator=generator).to(DEVICE)
    best = {name: {"prefill": float("inf"), "first": float("inf"), "all": float("inf")} for name in models}
    tokens = {}
    with torch.no_grad():
        for name, model in models.items():  # warm up
            tokens[name] = _greedy(model, short_prompt, DECODE)[0, short_prompt.shape[1]:].tolist()
    for _ in range(ROUNDS):
        for name, model in models.items():
            times = best[name]
            times["prefill"] = min(times["prefill"], _seconds(lambda: model(long_prompt)))
            times["first"] = min(times["first"], _seconds(lambda: _greedy(model, short_prompt, 1)))
            times["all"] = min(times["all"], _seconds(lambda: _greedy(model, short_prompt, DECODE + 1)))
    mine = best["moefuse"]
    decode_s = {name: max(t["all"] - t["first"], 1e-9) for name, t in best.items()}
    for name in IMPLEMENTATIONS[1:]:
        peer = best[name]
        row = dict(
            config=f"{EXPERTS}x SmolLM2-135M top-2 {str(dtype)[6:]} vs {name}", experts=EXPERTS, dtype=str(dtype),
            peer=name, prefill_tokens=PREFILL, decode_tokens=DECODE,
            moefuse_prefill_ms=mine["prefill"] * 1e3, peer_prefill_ms=peer["prefill"] * 1e3,
            prefill_speedup=peer["prefill"] / mine["prefill"],
            moefuse_decode_tok_s=DECODE / decode_s["moefuse"], peer_decode_tok_s=DECODE / decode_s[name],
            decode_speedup=decode_s[name] / decode_s["moefuse"],
            agreeing_greedy_tokens=_agreeing(tokens["moefuse"], tokens[name]),
            default_vs_eager_agreeing_tokens=_agreeing(tokens["grouped_mm"], tokens["eager"]),
        )
        record(f"generate_{DEVICE}", row)
        ROWS.append(row)


def _agreeing(first: list, second: list) -> int:
    """Number of leading tokens the two greedy continuations share."""
    return next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


def markdown_table(path: Path) -> str:
    """One line per (dtype, peer): prefill and decode speed of moefuse and the peer."""
    data = json.loads(Path(path).read_text())
    lines = [
        f"Measured on {data['machine']['device']}, torch {data['machine']['torch']}, commit "
        f"{data['machine']['commit']}, {data['machine']['date']}. Best of rounds; speedup = peer time / "
        "moefuse time.",
        "",
        "| model | dtype | vs | prefill ms moefuse / peer | prefill speedup | decode tok/s moefuse / peer "
        "| decode speedup | leading greedy tokens equal |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['experts']}x SmolLM2-135M, top-2 ({r['prefill_tokens']}-token prefill, {r['decode_tokens']} decoded) "
            f"| {r['dtype'][6:]} | {r['peer']} | {r['moefuse_prefill_ms']:.0f} / {r['peer_prefill_ms']:.0f} "
            f"| {r['prefill_speedup']:.2f}x | {r['moefuse_decode_tok_s']:.1f} / {r['peer_decode_tok_s']:.1f} "
            f"| {r['decode_speedup']:.2f}x | {r['agreeing_greedy_tokens']} of {r['decode_tokens']} |"
        )
    return "\n".join(lines)


def plot(rows: list, path: Path, device: str) -> None:
    """Prefill and decode tokens/s per implementation, one group of bars per dtype."""
    plt = plots.pyplot()

    dtypes = sorted({r["dtype"] for r in rows})
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (phase, key, tokens) in zip(axes, [("prefill", "prefill_ms", "prefill_tokens"),
                                                 ("decode", "decode_tok_s", "decode_tokens")]):
        for offset, name in enumerate(("moefuse", *dict.fromkeys(r["peer"] for r in rows))):
            values = []
            for dtype in dtypes:
                row = next(r for r in rows if r["dtype"] == dtype and (name == "moefuse" or r["peer"] == name))
                value = row[f"{'moefuse' if name == 'moefuse' else 'peer'}_{key}"]
                values.append(row[tokens] / value * 1e3 if key.endswith("_ms") else value)
            axis.bar([d * 4 + offset for d in range(len(dtypes))], values, label=name)
        axis.set_xticks([d * 4 + 1 for d in range(len(dtypes))], [d[6:] for d in dtypes])
        axis.set(ylabel="tokens/s", title=phase)
        axis.legend()
    plots.save_figure(figure, path, title=f"generation with a merged MoE on {device}")


if __name__ == "__main__":
    common.table_cli(sys.argv, markdown_table, plot)
