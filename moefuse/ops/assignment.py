"""Linear assignment (the linear sum assignment problem) on dense cost matrices.

Given a cost matrix C of shape [R, K], choose min(R, K) pairs (i, j) with distinct rows and distinct
columns minimizing (or, with `maximize`, maximizing) sum C[i, j]: a full assignment of the smaller
side. +inf entries (-inf when maximizing) mark forbidden pairs.

`linear_assignment` dispatches to the C++ solver of the extension (Jonker-Volgenant reductions plus
shortest augmenting paths, csrc/lap_cpu.cpp); finite CUDA matrices go to the CUDA auction solver
(csrc/lap_cuda.cu, where the extension was built with MOEFUSE_BUILD_CUDA=1: exact for integer costs,
otherwise within (max - min) * 2**-20 of the optimal total), other CUDA matrices to the CPU solver;
without the extension, to `linear_assignment_reference`, a plain PyTorch shortest augmenting path solver
(correct, much slower; warns once that the fast path is missing).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple

import torch

from moefuse.errors import AssignmentError

_warned = False


@functools.lru_cache(maxsize=None)
def _extension() -> Tuple[Optional[object], str]:
    try:
        from moefuse import _C
    except ImportError as error:
        return None, str(error)
    if not hasattr(_C, "linear_assignment"):
        return None, "moefuse._C was built without the assignment solver (rebuild it)"
    return _C, ""


def _cpu_solver():
    global _warned
    module, reason = _extension()
    if module is None and not _warned:
        _warned = True
        warnings.warn(
            f"moefuse: the C++ extension is unavailable ({reason}); linear_assignment uses the slow "
            "PyTorch reference solver. Reinstall with the README's setup command to build it.",
            stacklevel=3,
        )
    return module


def _as_cost(cost) -> torch.Tensor:
    """Validate and convert to a float32/float64/int64 tensor (other integers and bool to int64,
    16-bit floats to float32). The solvers compute in float64, exact for integers up to 2**53."""
    if not isinstance(cost, torch.Tensor):
        cost = torch.as_tensor(cost)
    if cost.dim() != 2:
        raise AssignmentError(f"the cost matrix must be 2-D, got shape {list(cost.shape)}")
    if cost.is_complex():
        raise AssignmentError(f"the cost matrix of shape {list(cost.shape)} is complex; pass real costs")
    if not cost.is_floating_point():
        if cost.dtype != torch.int64:
            cost = cost.to(torch.int64)
    elif cost.dtype not in (torch.float32, torch.float64):
        cost = cost.to(torch.float32)
    return cost


def _empty(device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(0, dtype=torch.int64, device=device),) * 2


def linear_assignment(cost, maximize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Optimal assignment of a dense cost matrix, like `scipy.optimize.linear_sum_assignment`.

    For C of shape [R, K] returns (row_ind, col_ind), int64 tensors of length min(R, K) with
    row_ind ascending, such that sum C[row_ind, col_ind] is minimal (maximal if `maximize`) over all
    choices of distinct rows and distinct columns. +inf entries (-inf when maximizing) are forbidden
    pairs; NaN, or an infinity of the other sign, raises AssignmentError, and so does a matrix with no
    complete assignment that avoids the forbidden pairs. Integer costs are solved exactly (as float64
    up to 2**53); 16-bit floats are widened to float32. Accepts tensors or anything
    `torch.as_tensor` takes; the outputs live on the cost's device. Finite CUDA matrices are solved on
    the GPU by auction (exact for integer costs; for others the total is within (max - min) * 2**-20
    of the optimum, and ties may be broken differently from scipy).

    Example: cost [[4, 1, 3], [2, 0, 5], [3, 2, 2]] -> rows [0, 1, 2], columns [1, 0, 2], total 5.
    """
    cost = _as_cost(cost)
    device = cost.device
    if cost.numel() == 0:
        return _empty(device)
    module = _cpu_solver()
    if cost.is_cuda and hasattr(module, "linear_assignment_cuda") and bool(torch.isfinite(cost).all()):
        with torch.cuda.device(device):
            return module.linear_assignment_cuda(cost, maximize, torch.cuda.current_stream().cuda_stream)
    host = cost.cpu()
    if module is None:
        rows, cols = linear_assignment_reference(host, maximize)
    else:
        try:
            rows, cols = module.linear_assignment(host, maximize)
        except ValueError as error:  # the C++ solver's "invalid:" / "infeasible:" messages
            raise AssignmentError(str(error).split(": ", 1)[-1]) from None
    return rows.to(device), cols.to(device)


def _check_entries(cost: torch.Tensor, maximize: bool) -> None:
    """Reject NaN and the infinity that cannot be a forbidden pair."""
    wrong = float("inf") if maximize else float("-inf")
    bad_inf = bool((cost == wrong).any())
    if bool(torch.isnan(cost).any()) or bad_inf:
        what = f"{wrong:+}" if bad_inf else "NaN"
        allowed = "-inf" if maximize else "+inf"
        raise AssignmentError(
            f"the cost matrix of shape {list(cost.shape)} holds {what} entries; only finite values and "
            f"{allowed} (a forbidden pair) are allowed"
        )


def linear_assignment_reference(cost, maximize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch shortest augmenting path solver, same contract as `linear_assignment`.

    Rows <= columns after an optional transpose. For each row f in turn, Dijkstra over the reduced
    costs C[i, j] - v[j] - u[i] (column prices v, implicit row duals u[i] = C[i, x_i] - v[x_i]) finds the
    cheapest alternating path from f to an unassigned column; the prices of the scanned columns fall by
    (path length - their distance), which keeps every reduced cost >= 0 and every assigned pair at 0,
    and the path is flipped. After the last row, complementary slackness proves optimality.
    """
    original = _as_cost(cost)
    if original.numel() == 0:
        return _empty(original.device)
    _check_entries(original, maximize)
    c = original.detach().to("cpu", torch.float64)
    transpose = c.shape[0] > c.shape[1]
    if transpose:
        c = c.t()
    if maximize:
        c = -c
    c = c.contiguous()
    rows, cols = c.shape
    inf = float("inf")
    prices = torch.zeros(cols, dtype=torch.float64)
    col_of_row = [-1] * rows
    row_of_col = torch.full((cols,), -1, dtype=torch.int64)
    for free_row in range(rows):
        distance = torch.full((cols,), inf, dtype=torch.float64)
        predecessor = torch.zeros(cols, dtype=torch.int64)
        scanned = torch.zeros(cols, dtype=torch.bool)
        row, offset = free_row, 0.0
        while True:
            reach = (c[row] - prices + offset).masked_fill(scanned, inf)
            shorter = reach < distance
            distance = torch.where(shorter, reach, distance)
            predecessor[shorter] = row
            open_distance = distance.masked_fill(scanned, inf)
            low = float(open_distance.min())
            if low == inf:
                raise AssignmentError(
                    f"the cost matrix of shape {list(original.shape)} has no complete assignment avoiding its "
                    "forbidden (infinite) entries"
                )
            at_low = open_distance == low
            free_at_low = at_low & (row_of_col < 0)
            if bool(free_at_low.any()):
                sink = int(free_at_low.nonzero()[0])
                break
            column = int(at_low.nonzero()[0])
            scanned[column] = True
            row = int(row_of_col[column])
            offset = low - float(c[row, column] - prices[column])
        prices[scanned] += distance[scanned] - low
        column = sink
        while True:
            row = int(predecessor[column])
            row_of_col[column] = row
            column, col_of_row[row] = col_of_row[row], column
            if row == free_row:
                break
    assigned = torch.tensor(col_of_row, dtype=torch.int64)
    if not transpose:
        return torch.arange(rows, dtype=torch.int64), assigned
    order = torch.argsort(assigned)
    return assigned[order], order
