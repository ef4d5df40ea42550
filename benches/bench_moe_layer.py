"""One sparse MoE block's experts: moefuse.grouped_moe vs transformers' experts implementations
(`eager`, `grouped_mm` (the default), `batched_mm`) and torch's own grouped_mm, same data, same run.

Run: python -m pytest benches/bench_moe_layer.py (MOEFUSE_BENCH_QUICK=1 for a short smoke run;
MOEFUSE_BENCH_THREADS=N to fix the CPU thread count); python -m benches.bench_moe_layer
benches/results/moe_layer_cpu.json [--plot] prints the Markdown table (and redraws the PNG).

GPU: Mixtral-8x7B (H 4096, I 14336, E 8, top-2) and Qwen3-30B-A3B (H 2048, I 768, E 128, top-8)
shapes in bf16, 1..8192 tokens. CPU (2 cores): the same layouts scaled down, 1..512 tokens.
Per configuration: best-of-rounds time (all implementations take turns in each round), TFLOP/s
(2 * 3 * H * I per token-expert pair) against a dense matmul measured on the same device, GB/s of
expert weights read (the experts that receive tokens) against a tensor copy, and peak extra
memory in MB. `batched_mm` copies the weights of
every token-expert pair and is skipped where that copy would exceed a memory cap.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moefuse
from benches import common, plots

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
common.apply_thread_setting()
if DEVICE == "cuda":
    SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
    TOKENS = (1, 16, 128, 1024, 8192)
    DTYPES = (torch.bfloat16,)
    BATCHED_CAP = 16 << 30
else:
    SHAPES = {"mixtral-small": (1024, 2048, 8, 2), "qwen3-small": (512, 384, 64, 8)}
    TOKENS = (1, 8, 64, 512)
    DTYPES = (torch.float32, torch.bfloat16)
    BATCHED_CAP = 2 << 30
if common.quiet_env():
    TOKENS = TOKENS[:2]
    DTYPES = DTYPES[:1]
PEERS = ("eager", "grouped_mm", "batched_mm", "torch_grouped_mm")
CONFIGS = [(shape, tokens, dtype) for shape in SHAPES for dtype in DTYPES for tokens in TOKENS]
ROWS: list = []  # this module's rows, for its own plot (benches/plots.py draws single-peer bars)


_plot_at_the_end = common.plot_at_module_end(ROWS, f"moe_layer_{DEVICE}", lambda *args: plot(*args))


def _problem(shape: str, tokens: int, dtype: torch.dtype):
    hidden, inter, experts, top_k = SHAPES[shape]
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE, dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=generator) * hidden ** -0.5).to(DEVICE, dtype)
    down = (torch.randn(experts, hidden, inter, generator=generator) * inter ** -0.5).to(DEVICE, dtype)
    logits = torch.randn(tokens, experts, generator=generator).to(DEVICE)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return x, gate_up, down, ids, weights.to(dtype)


def _hf_experts(implementation: str, gate_up: torch.Tensor, down: torch.Tensor):
    """transformers' Qwen3-MoE experts module (the same code as Mixtral's and OLMoE's) holding
    the given weights, running `implementation`."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    experts, two_inter, hidden = gate_up.shape
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=two_inter // 2, num_experts=experts)
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return module


def _torch_grouped_mm(x, gate_up, down, ids, weights):
    """The experts with torch's grouped matmul called directly (sort, two grouped_mm, unsort)."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    top_k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    gate_up_out = grouped_mm(x[order // top_k], gate_up.transpose(1, 2), offs=offsets)
    gate, up = gate_up_out.chunk(2, dim=-1)
    y = grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets) * weights.reshape(-1)[order, None]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, order // top_k, y.float()).to(x.dtype)


def _peer_fn(peer: str, problem):
    x, gate_up, down, ids, weights = problem
    if peer == "torch_grouped_mm":
        if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
            return None
        return lambda: _torch_grouped_mm(x, gate_up, down, ids, weights)
    copied_weights = ids.numel() * 3 * gate_up.shape[1] // 2 * gate_up.shape[2] * x.element_size()
    if peer == "batched_mm" and copied_weights > BATCHED_CAP:
        return None
    module = _hf_experts(peer, gate_up, down)
    return lambda: module(x, ids, weights)


@functools.lru_cache(maxsize=None)
def _dense_tflops(dtype: torch.dtype) -> float:
    """TFLOP/s of one large dense matmul on this device: the practical compute peak."""
    n = 4096 if DEVICE == "cuda" else 1024
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    seconds = common.best_seconds(lambda: a @ a, DEVICE, rounds=5)
    return 2 * n ** 3 / seconds / 1e12


@functools.lru_cache(maxsize=None)
def _copy_gbps() -> float:
    return common.copy_bandwidth(torch.empty(64 << 20, dtype=torch.uint8, device=DEVICE))


def _best_interleaved(fns, rounds: int):
    """Best-of-`rounds` seconds of each function, the functions taking turns within every round so
    that all of them see the same machine load (the CPU machine is shared)."""
    best = [float("inf")] * len(fns)
    with torch.no_grad():
        for fn in fns:
            fn()  # warm up (Triton compilation, thread pools)
        for _ in range(rounds):
            for index, fn in enumerate(fns):
                best[index] = min(best[index], common.best_seconds(fn, DEVICE, 1))
    return best


def _peak_mb(fn) -> float:
    gc.collect()
    with torch.no_grad():
        return common.peak_extra_bytes(fn, DEVICE) / 2 ** 20


@pytest.mark.parametrize("shape,tokens,dtype", CONFIGS,
                         ids=[f"{s}-T{t}-{str(d)[6:]}" for s, t, d in CONFIGS])
def test_moe_layer_speed(benchmark, record, shape, tokens, dtype):
    problem = _problem(shape, tokens, dtype)
    x, gate_up, down, ids, weights = problem
    hidden, inter, experts, top_k = SHAPES[shape]
    rounds = 7 if tokens <= 64 else 5
    run_moefuse = lambda: moefuse.grouped_moe(x, gate_up, down, ids, weights)  # noqa: E731
    peers = {peer: fn for peer in PEERS if (fn := _peer_fn(peer, problem)) is not None}
    moefuse_s, *peer_seconds = _best_interleaved([run_moefuse, *peers.values()], rounds)
    with torch.no_grad():
        benchmark.pedantic(run_moefuse, rounds=3, iterations=1)
    moefuse_mb = _peak_mb(run_moefuse)
    flops = 2 * 3 * hidden * inter * ids.numel()
    weight_bytes = int(torch.unique(ids).numel()) * 3 * hidden * inter * x.element_size()
    dense, copy = _dense_tflops(dtype), _copy_gbps()
    for (peer, run_peer), peer_s in zip(peers.items(), peer_seconds):
        peer_mb = _peak_mb(run_peer)
        row = dict(
            config=f"{shape} T={tokens} {str(dtype)[6:]} vs {peer}", shape=shape, tokens=tokens, dtype=str(dtype),
            hidden=hidden, intermediate=inter, experts=experts, top_k=top_k, peer=peer,
            moefuse_ms=moefuse_s * 1e3, peer_ms=peer_s * 1e3, speedup_over_peer=peer_s / moefuse_s,
            moefuse_tflops=flops / moefuse_s / 1e12, peer_tflops=flops / peer_s / 1e12, dense_mm_tflops=dense,
            moefuse_gbps=weight_bytes / moefuse_s / 1e9, peer_gbps=weight_bytes / peer_s / 1e9, copy_gbps=copy,
            moefuse_peak_mb=moefuse_mb, peer_peak_mb=peer_mb,
        )
        benchmark.extra_info[peer] = row["speedup_over_peer"]
        record(f"moe_layer_{DEVICE}", row)
        ROWS.append(row)


def markdown_table(path: Path) -> str:
    """One line per (shape, tokens, dtype): moefuse and each peer in ms, moefuse's TFLOP/s and GB/s
    as fractions of the measured dense matmul and copy."""
    data = json.loads(Path(path).read_text())
    peers = [p for p in PEERS if any(r["peer"] == p for r in data["rows"])]
    lines = [
        f"Measured on {data['machine']['device']}, torch {data['machine']['torch']}, commit "
        f"{data['machine']['commit']}, {data['machine']['date']}. Times in ms (best of rounds); speedup = "
        "peer time / moefuse time; \"-\": skipped (memory cap).",
        "",
        "| shape | T | dtype | moefuse | " + " | ".join(peers) + " | moefuse TFLOP/s (dense mm) | "
        "moefuse weight GB/s (copy) | peak MB moefuse / grouped_mm |",
        "|---|---:|---|---:|" + "---:|" * len(peers) + "---:|---:|---:|",
    ]
    groups = {}
    for row in data["rows"]:
        groups.setdefault((row["shape"], row["tokens"], row["dtype"]), {})[row["peer"]] = row
    for (shape, tokens, dtype), rows in groups.items():
        any_row = next(iter(rows.values()))
        cells = [f"{rows[p]['peer_ms']:.2f} ({rows[p]['speedup_over_peer']:.2f}x)" if p in rows else "-"
                 for p in peers]
        default = f"{rows['grouped_mm']['peer_peak_mb']:.1f}" if "grouped_mm" in rows else "-"
        peak = f"{any_row['moefuse_peak_mb']:.1f} / {default}"
        lines.append(
            f"| {shape} | {tokens} | {dtype[6:]} | {any_row['moefuse_ms']:.2f} | " + " | ".join(cells)
            + f" | {any_row['moefuse_tflops']:.3f} ({any_row['dense_mm_tflops']:.2f}) | "
            f"{any_row['moefuse_gbps']:.1f} ({any_row['copy_gbps']:.1f}) | {peak} |"
        )
    return "\n".join(lines)


def plot(rows: list, path: Path, device: str) -> None:
    """Milliseconds against tokens, one line per implementation, one panel per (shape, dtype)."""
    plt = plots.pyplot()

    panels = sorted({(r["shape"], r["dtype"]) for r in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for axis, (shape, dtype) in zip(axes[0], panels):
        mine = [r for r in rows if (r["shape"], r["dtype"]) == (shape, dtype)]
        lines = {"moefuse": {r["tokens"]: r["moefuse_ms"] for r in mine}}
        for r in mine:
            lines.setdefault(r["peer"], {})[r["tokens"]] = r["peer_ms"]
        for name, points in lines.items():
            tokens = sorted(points)
            axis.plot(tokens, [points[t] for t in tokens], marker="o", label=name,
                      linewidth=2.5 if name == "moefuse" else 1)
        axis.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms (best of rounds)",
                 title=f"{shape} {dtype[6:]}")
        axis.legend(fontsize=7)
    plots.save_figure(figure, path, dpi=100, title=f"MoE block experts on {device}")


if __name__ == "__main__":
    common.table_cli(sys.argv, markdown_table, plot)
