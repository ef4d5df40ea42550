"""The CUDA auction solver: csrc/lap_cuda.cu compiles with nvcc (no GPU needed), its torch launcher
compiles with MOEFUSE_CUDA defined, and on a GPU (extension built with MOEFUSE_BUILD_CUDA=1) its
optimal totals match scipy's."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import moefuse
from moefuse.ops import assignment
from tests.helpers import require_peer

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_solver_compiles_with_nvcc(tmp_path):
    result = subprocess.run(
        ["nvcc", "-c", str(CSRC / "lap_cuda.cu"), f"-I{CSRC}", "-std=c++17", "-O3", "-Werror", "all-warnings",
         "-o", str(tmp_path / "lap_cuda.o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lap_cuda.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_cuda_launcher_and_bindings_compile_with_moefuse_cuda_defined(tmp_path):
    from torch.utils.cpp_extension import include_paths

    unit = tmp_path / "unit.cpp"  # one translation unit: torch's headers are parsed once
    unit.write_text(f'#include "{CSRC / "lap_cuda_launch.cpp"}"\n#include "{CSRC / "bindings.cpp"}"\n')
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    result = subprocess.run(
        ["g++", "-fsyntax-only", "-std=c++17", "-DMOEFUSE_CUDA", "-DTORCH_EXTENSION_NAME=_C", *includes, str(unit)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


def _cuda_solver():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    module = assignment._extension()[0]
    if module is None or not hasattr(module, "linear_assignment_cuda"):
        pytest.skip("moefuse._C was built without CUDA (MOEFUSE_BUILD_CUDA=1)")
    return module


def _total(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    assert rows.is_cuda and cols.is_cuda and rows.dtype == cols.dtype == torch.int64
    rows, cols = rows.cpu(), cols.cpu()
    assert torch.equal(rows, torch.sort(rows).values) and len(set(cols.tolist())) == len(cols)
    return float(cost.double()[rows, cols].sum())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 2), (5, 9), (9, 5), (64, 64), (300, 700), (1000, 1000), (2048, 2048)])
@pytest.mark.parametrize("kind", ["integer", "uniform32", "uniform64"])
@pytest.mark.parametrize("maximize", [False, True])
def test_cuda_solver_matches_scipy(shape, kind, maximize):
    _cuda_solver()
    scipy_optimize = require_peer("scipy.optimize")
    generator = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    if kind == "integer":
        cost = torch.randint(0, 1000, shape, generator=generator)
    else:
        cost = torch.rand(shape, generator=generator, dtype=torch.float32 if kind == "uniform32" else torch.float64)
    rows, cols = moefuse.linear_assignment(cost.cuda(), maximize=maximize)
    total = _total(cost, rows, cols)
    dense = cost.double().numpy()
    expected = dense[scipy_optimize.linear_sum_assignment(dense, maximize=maximize)].sum()
    if kind == "integer":
        assert total == expected  # exact: final eps < 1/n
    else:
        span = float(cost.max() - cost.min())
        assert abs(total - expected) <= span * 2.0**-20 + 1e-9 * abs(expected), (total, expected)


@pytest.mark.gpu
def test_cuda_degenerate_and_forbidden():
    _cuda_solver()
    rows, cols = moefuse.linear_assignment(torch.full((50, 50), 3.0, device="cuda"))
    assert sorted(cols.tolist()) == list(range(50)) and rows.is_cuda
    cost = torch.ones(4, 4, dtype=torch.float64)
    cost[0, 1:] = float("inf")  # forbidden entries go to the CPU solver; outputs stay on the GPU
    rows, cols = moefuse.linear_assignment(cost.cuda())
    assert cols.is_cuda and int(cols[0]) == 0
    with pytest.raises(moefuse.errors.AssignmentError, match="no complete assignment"):
        moefuse.linear_assignment(torch.full((3, 3), float("inf"), device="cuda"))
    assert np.isfinite(_total(cost, rows, cols))


def _auction_emulation(cost: np.ndarray, final_eps: float) -> np.ndarray:
    """The rounds of lap_cuda.cu in NumPy (bids, highest offer per column with ties to the lowest
    row, evictions, epsilon phases), to check the algorithm where no GPU runs its kernels."""
    rows, n = cost.shape
    value = -np.vstack([cost, np.zeros((n - rows, n))])  # virtual zero-cost rows pad to square
    price = np.zeros(n)
    eps = max((cost.max() - cost.min()) / 8, final_eps)
    while True:
        owner, row_col = np.full(n, -1), np.full(n, -1)
        bidders = np.arange(n)
        while len(bidders):
            net = value[bidders] - price
            best = net.argmax(axis=1)
            top = net[np.arange(len(bidders)), best]
            net[np.arange(len(bidders)), best] = -np.inf
            offers = price[best] + (top - net.max(axis=1)) + eps
            unassigned = []
            for j in np.unique(best):
                mine = np.flatnonzero(best == j)
                winner = mine[np.argmax(offers[mine])]
                unassigned += [bidders[k] for k in mine if k != winner]
                if owner[j] >= 0:
                    row_col[owner[j]] = -1
                    unassigned.append(owner[j])
                owner[j], row_col[bidders[winner]], price[j] = bidders[winner], j, offers[winner]
            bidders = np.array(unassigned, dtype=np.int64)
        if eps <= final_eps:
            return row_col[:rows]
        eps = max(eps / 8, final_eps)


@pytest.mark.parametrize("shape", [(2, 2), (6, 6), (5, 12), (40, 40), (60, 90)])
def test_auction_algorithm_optimality(shape):
    scipy_optimize = require_peer("scipy.optimize")
    generator = np.random.default_rng(shape[0] * 100 + shape[1])
    for integer in (True, False):
        cost = generator.integers(0, 50, shape).astype(np.float64) if integer else generator.random(shape)
        n = shape[1]
        span = cost.max() - cost.min()
        final_eps = 1 / (n + 1) if integer else span * 2.0**-20 / n
        cols = _auction_emulation(cost, final_eps)
        assert len(set(cols.tolist())) == shape[0] and cols.min() >= 0
        total = cost[np.arange(shape[0]), cols].sum()
        expected = cost[scipy_optimize.linear_sum_assignment(cost)].sum()
        if integer:
            assert total == expected
        else:
            assert expected <= total <= expected + n * final_eps + 1e-12
