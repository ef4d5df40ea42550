"""Tensor-level merge speed and memory: moefuse vs mergekit 0.1.5's own method code.

Run: python -m pytest benches/bench_merge.py (MOEFUSE_BENCH_QUICK=1 for a short smoke run).
Each configuration merges the same random tensors with both tools in the same run; reported:
time (best of rounds), speedup, bandwidth (N + 1 inputs read, 1 output written) against a plain
copy on the same device, and peak extra memory in multiples of one input tensor.
"""

from __future__ import annotations

import gc

import pytest
import torch

import moefuse
from benches import common
from tests.mergekit_peer import mergekit_merge

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = {
    "ties": dict(density=0.3, weight=0.5),
    "dare_ties": dict(density=0.3, weight=0.5),
    "task_arithmetic": dict(weight=0.5),
}
if common.quiet_env():
    CONFIGS = [(m, 2, 1 << 20, torch.float32) for m in METHODS]
else:
    CONFIGS = [
        (method, n, size, dtype)
        for method in METHODS
        for n in (2, 4, 8)
        for size in (4 << 20, 16 << 20)
        for dtype in (torch.float32, torch.bfloat16)
    ] + [("ties", 4, 64 << 20, torch.float32), ("ties", 4, 64 << 20, torch.bfloat16)]


# The other methods at one size: (name, method, models, params); 4096 x 4096 entries, since
# DELLA ranks and filter-wise Model Stock interpolates within rows.
OTHER_METHODS = [
    ("linear", "linear", 4, dict(weight=[0.4, 0.3, 0.2, 0.1])),
    ("slerp", "slerp", 1, dict(t=0.4)),
    ("model_stock", "model_stock", 4, {}),
    ("model_stock filter_wise", "model_stock", 4, dict(filter_wise=True)),
    ("breadcrumbs_ties", "breadcrumbs_ties", 4, dict(density=0.3, gamma=0.01, weight=0.5)),
    ("della", "della", 4, dict(density=0.5, epsilon=0.1, weight=0.5)),
    ("nuslerp", "nuslerp", 2, dict(weight=[0.4, 0.6])),
    ("nuslerp rows", "nuslerp", 2, dict(weight=[0.4, 0.6], nuslerp_flatten=False)),
    ("multislerp", "multislerp", 4, dict(weight=[0.4, 0.3, 0.2, 0.1])),
    ("karcher", "karcher", 4, {}),
    ("nearswap", "nearswap", 1, dict(t=0.005)),
    ("sce", "sce", 4, dict(select_topk=0.3)),
]
OTHER_SHAPE = (512, 512) if common.quiet_env() else (4096, 4096)
OTHER_CONFIGS = [(entry, dtype) for entry in OTHER_METHODS for dtype in (torch.float32, torch.bfloat16)]


def _inputs(n, size, dtype):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(size, generator=generator)
    tensors = [(base + 0.01 * torch.randn(size, generator=generator)).to(dtype).to(DEVICE) for _ in range(n)]
    return base.to(dtype).to(DEVICE), tensors


@pytest.mark.parametrize(
    "method,n,size,dtype", CONFIGS,
    ids=[f"{m}-N{n}-{s >> 20}M-{str(d)[6:]}" for m, n, s, d in CONFIGS],
)
def test_merge_speed(benchmark, record, method, n, size, dtype):
    base, tensors = _inputs(n, size, dtype)
    row = _measure(benchmark, method, base, tensors, METHODS[method])
    row = dict(config=f"{method} N={n} {size >> 20}M {str(dtype)[6:]}", method=method, n=n, numel=size,
               dtype=str(dtype), **row)
    benchmark.extra_info.update(row)
    record(f"merge_{DEVICE}", row)


@pytest.mark.parametrize("entry,dtype", OTHER_CONFIGS, ids=[f"{e[0]}-{str(d)[6:]}" for e, d in OTHER_CONFIGS])
def test_other_methods_speed(benchmark, record, entry, dtype):
    name, method, n, params = entry
    base, tensors = _inputs(n, OTHER_SHAPE, dtype)
    if method in ("linear", "karcher"):  # no base role: the base is one of the inputs
        base, tensors = None, [base, *tensors[1:]]
    row = _measure(benchmark, method, base, tensors, params)
    shape = "x".join(map(str, OTHER_SHAPE))
    row = dict(config=f"{name} N={len(tensors)} {shape} {str(dtype)[6:]}", method=method, n=len(tensors),
               numel=tensors[0].numel(), dtype=str(dtype), **row)
    benchmark.extra_info.update(row)
    record(f"merge_methods_{DEVICE}", row)


def _measure(benchmark, method, base, tensors, params) -> dict:
    """Times and peak extra memory of moefuse and mergekit on the same tensors."""
    run_moefuse = lambda: moefuse.merge_tensors(base, tensors, method, **params)
    run_peer = lambda: mergekit_merge(method, base, tensors, **params)

    run_moefuse()  # warm up (thread pool, Triton compilation)
    moefuse_s = common.best_seconds(run_moefuse, DEVICE, rounds=3)
    benchmark.pedantic(run_moefuse, rounds=3, iterations=1)
    reference = tensors[0]
    peer_s = common.best_seconds(run_peer, DEVICE, rounds=1 if reference.numel() >= 16 << 20 else 2)
    gc.collect()
    tensor_bytes = reference.numel() * reference.element_size()
    moefuse_mem = common.peak_extra_bytes(run_moefuse, DEVICE) / tensor_bytes
    gc.collect()
    peer_mem = common.peak_extra_bytes(run_peer, DEVICE) / tensor_bytes
    moved = (len(tensors) + (2 if base is not None else 1)) * tensor_bytes
    return dict(
        peer="mergekit 0.1.5", moefuse_ms=moefuse_s * 1e3, peer_ms=peer_s * 1e3, speedup=peer_s / moefuse_s,
        moefuse_gbps=moved / moefuse_s / 1e9, copy_gbps=common.copy_bandwidth(reference),
        moefuse_extra_mem_x=moefuse_mem, peer_extra_mem_x=peer_mem,
    )
