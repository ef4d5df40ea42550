"""Linear assignment speed: moefuse.linear_assignment vs scipy.optimize.linear_sum_assignment.

Run: python -m pytest benches/bench_lap.py (MOEFUSE_BENCH_QUICK=1 for a short smoke run).
Square cost matrices n = 256 .. 4096, uniform random float64 and float32 costs and random integer
costs in [0, n); every tool solves the same matrix in the same run (time: best of rounds), and the
optimal totals are checked to agree. The `lap` (lapjv) and `lapjv` packages, where installed, are
timed as extra peers (`lapjv` solves in float32 internally, so its total may differ in the last bits).
Peak extra memory is in multiples of one cost matrix.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata

import numpy as np
import pytest
import torch

import moefuse
from benches import common

scipy_optimize = pytest.importorskip("scipy.optimize")
SIZES = (256, 512) if common.quiet_env() else (256, 512, 1024, 2048, 4096)
KINDS = ("uniform-float64", "uniform-float32", "integer")


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


LAP, LAPJV = _optional("lap"), _optional("lapjv")


def _cost(kind: str, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    if kind == "integer":
        return torch.randint(0, n, (n, n), generator=generator, dtype=torch.int64)
    dtype = torch.float64 if kind.endswith("64") else torch.float32
    return torch.rand(n, n, generator=generator, dtype=dtype)


def _rounds(n: int) -> int:
    return 3 if n <= 2048 else 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_lap_speed(benchmark, record, n, kind):
    cost = _cost(kind, n)
    dense = cost.numpy()
    as_float64 = dense.astype(np.float64)
    run_moefuse = lambda: moefuse.linear_assignment(cost)[1]
    run_scipy = lambda: torch.from_numpy(scipy_optimize.linear_sum_assignment(dense)[1])

    rows, cols = moefuse.linear_assignment(cost)
    expected_rows, expected_cols = scipy_optimize.linear_sum_assignment(dense)
    total, expected = as_float64[rows.numpy(), cols.numpy()].sum(), as_float64[expected_rows, expected_cols].sum()
    assert abs(total - expected) <= 1e-9 * max(1.0, abs(expected)), (total, expected)

    moefuse_s = common.best_seconds(run_moefuse, "cpu", rounds=_rounds(n))
    benchmark.pedantic(run_moefuse, rounds=1, iterations=1)
    scipy_s = common.best_seconds(run_scipy, "cpu", rounds=_rounds(n))
    gc.collect()
    matrix_bytes = cost.numel() * cost.element_size()
    row = dict(
        config=f"n={n} {kind}", n=n, kind=kind, peer=f"scipy {importlib.metadata.version('scipy')}",
        moefuse_ms=moefuse_s * 1e3, peer_ms=scipy_s * 1e3, speedup=scipy_s / moefuse_s,
        moefuse_total=float(total), peer_total=float(expected),
        moefuse_extra_mem_x=common.peak_extra_bytes(run_moefuse, "cpu") / matrix_bytes,
        peer_extra_mem_x=common.peak_extra_bytes(run_scipy, "cpu") / matrix_bytes,
    )
    if LAP is not None:
        row["lap_ms"] = 1e3 * common.best_seconds(lambda: LAP.lapjv(as_float64), "cpu", rounds=_rounds(n))
        row["lap_total"] = float(LAP.lapjv(as_float64)[0])
        row["lap_version"] = importlib.metadata.version("lap")
    if LAPJV is not None:
        row["lapjv_ms"] = 1e3 * common.best_seconds(lambda: LAPJV.lapjv(as_float64), "cpu", rounds=_rounds(n))
        col_of_row = LAPJV.lapjv(as_float64)[0]
        row["lapjv_total"] = float(as_float64[np.arange(n), col_of_row].sum())
        row["lapjv_version"] = importlib.metadata.version("lapjv")
    benchmark.extra_info.update(row)
    record("lap_cpu", row)


CUDA_SIZE = 14336  # a 7B model's FFN width


@pytest.mark.parametrize("kind", ["uniform-float32", "integer"])
def test_lap_cuda_speed(benchmark, record, kind):
    """The CUDA auction solver at n = 14336 against moefuse's CPU solver on the same matrix (one run)."""
    from moefuse.ops import assignment

    module = assignment._extension()[0]
    if not torch.cuda.is_available() or not hasattr(module, "linear_assignment_cuda"):
        pytest.skip("needs a GPU and moefuse._C built with MOEFUSE_BUILD_CUDA=1")
    cost = _cost(kind, CUDA_SIZE)
    device_cost = cost.cuda()
    run_cuda = lambda: moefuse.linear_assignment(device_cost)[1]
    run_cuda()  # warm up
    cuda_s = common.best_seconds(run_cuda, "cuda", rounds=2)
    benchmark.pedantic(run_cuda, rounds=1, iterations=1)
    rows, cols = moefuse.linear_assignment(device_cost)
    cpu_s = common.best_seconds(lambda: moefuse.linear_assignment(cost), "cpu", rounds=1)
    cpu_rows, cpu_cols = moefuse.linear_assignment(cost)
    as_float64 = cost.double()
    total, expected = float(as_float64[rows.cpu(), cols.cpu()].sum()), float(as_float64[cpu_rows, cpu_cols].sum())
    matrix_bytes = device_cost.numel() * device_cost.element_size()
    row = dict(
        config=f"n={CUDA_SIZE} {kind}", n=CUDA_SIZE, kind=kind, peer="moefuse CPU solver (1 thread)",
        moefuse_ms=cuda_s * 1e3, peer_ms=cpu_s * 1e3, speedup=cpu_s / cuda_s,
        moefuse_total=total, peer_total=expected, total_gap=total - expected,
        moefuse_extra_mem_x=common.peak_extra_bytes(run_cuda, "cuda") / matrix_bytes, peer_extra_mem_x=float("nan"),
    )
    benchmark.extra_info.update(row)
    record("lap_cuda", row)
