"""linear_assignment (C++ solver) and its PyTorch reference against scipy's linear_sum_assignment:
same optimal total on random, integer, tied, rectangular and forbidden-entry costs; the same
assignment where the optimum is unique; clear errors for bad matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moefuse
from moefuse.errors import AssignmentError, MoefuseError
from moefuse.ops import assignment
from moefuse.ops.assignment import linear_assignment_reference
from tests.helpers import missing_peer, require_peer

scipy_optimize = require_peer("scipy.optimize")


def _extension_solver(cost, maximize=False):
    if assignment._extension()[0] is None:
        missing_peer(f"the C++ extension ({assignment._extension()[1]})")
    return moefuse.linear_assignment(cost, maximize=maximize)


SOLVERS = {"extension": _extension_solver, "reference": linear_assignment_reference}


def _costs(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "uniform64":
        return torch.rand(rows, cols, generator=generator, dtype=torch.float64)
    if kind == "normal32":
        return torch.randn(rows, cols, generator=generator)
    if kind == "integer":  # few distinct values: many ties and many optimal assignments
        return torch.randint(0, 4, (rows, cols), generator=generator)
    if kind == "equal":
        return torch.full((rows, cols), 3.0, dtype=torch.float64)
    if kind == "forbidden":  # +inf pairs, with a feasible diagonal-ish assignment kept open
        cost = torch.randint(0, 100, (rows, cols), generator=generator).double()
        cost[torch.rand(rows, cols, generator=generator) < 0.4] = float("inf")
        keep = torch.randperm(max(rows, cols), generator=generator)
        for i in range(min(rows, cols)):
            if rows <= cols:
                cost[i, keep[i]] = 7.0
            else:
                cost[keep[i], i] = 7.0
        return cost
    raise ValueError(kind)


def _check_against_scipy(solver, cost: torch.Tensor, maximize: bool = False, unique: bool = False) -> None:
    rows, cols = solver(cost, maximize)
    dense = cost.double().numpy()
    expected_rows, expected_cols = scipy_optimize.linear_sum_assignment(dense, maximize=maximize)
    assert rows.dtype == cols.dtype == torch.int64
    assert rows.shape == cols.shape == (min(cost.shape),)
    assert torch.equal(rows, torch.sort(rows).values), "row_ind must ascend"
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols), "not a matching"
    total = dense[rows.numpy(), cols.numpy()].sum()
    expected = dense[expected_rows, expected_cols].sum()
    assert np.isfinite(total), "the assignment uses a forbidden pair"
    tolerance = 1e-12 * (1.0 + abs(expected)) * len(expected_rows)
    assert abs(total - expected) <= tolerance, f"total {total} vs scipy {expected} for shape {tuple(cost.shape)}"
    if unique:
        assert rows.tolist() == expected_rows.tolist() and cols.tolist() == expected_cols.tolist()


SHAPES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (5, 3), (17, 17), (31, 64), (64, 31), (100, 100)]


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("kind", ["uniform64", "normal32", "integer", "equal", "forbidden"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_matches_scipy(solver, kind, shape):
    for seed in range(3):
        cost = _costs(kind, *shape, seed=seed)
        _check_against_scipy(SOLVERS[solver], cost, maximize=False, unique=kind in ("uniform64", "normal32"))


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("shape", [(1, 1), (6, 9), (9, 6), (40, 40)])
def test_maximize(solver, shape):
    for seed in range(3):
        cost = _costs("normal32", *shape, seed=seed)
        _check_against_scipy(SOLVERS[solver], cost, maximize=True, unique=True)
        forbidden = _costs("forbidden", *shape, seed=seed)
        forbidden[torch.isinf(forbidden)] = float("-inf")
        _check_against_scipy(SOLVERS[solver], forbidden, maximize=True)


@pytest.mark.parametrize("n", [128, 257, 512, 1000, 2048])
@pytest.mark.parametrize("kind", ["uniform64", "normal32", "integer"])
def test_large_matches_scipy(n, kind):
    _check_against_scipy(_extension_solver, _costs(kind, n, n, seed=n), unique=kind != "integer")


@pytest.mark.parametrize("shape", [(300, 700), (700, 300)])
def test_large_rectangular_and_forbidden(shape):
    _check_against_scipy(_extension_solver, _costs("uniform64", *shape, seed=1), unique=True)
    _check_against_scipy(_extension_solver, _costs("forbidden", *shape, seed=2))


def test_reference_medium_sizes():
    for n in (150, 257):
        _check_against_scipy(linear_assignment_reference, _costs("uniform64", n, n, seed=n), unique=True)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_infeasible_forbidden_pattern(solver):
    cost = torch.ones(4, 5, dtype=torch.float64)
    cost[:, 2:] = float("inf")  # four rows compete for two usable columns
    with pytest.raises(AssignmentError, match=r"shape \[4, 5\].*no complete assignment"):
        SOLVERS[solver](cost)
    with pytest.raises(AssignmentError, match=r"shape \[5, 4\]"):
        SOLVERS[solver](cost.t())
    with pytest.raises(AssignmentError):
        SOLVERS[solver](torch.full((3, 3), float("-inf")), maximize=True)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_bad_entries(solver):
    cost = torch.rand(4, 4)
    cost[1, 2] = float("nan")
    with pytest.raises(AssignmentError, match=r"\[4, 4\] holds NaN"):
        SOLVERS[solver](cost)
    cost[1, 2] = float("-inf")
    with pytest.raises(AssignmentError, match="-inf"):
        SOLVERS[solver](cost)
    cost[1, 2] = float("inf")
    with pytest.raises(AssignmentError, match=r"\+inf"):
        SOLVERS[solver](cost, maximize=True)
    with pytest.raises(AssignmentError, match="2-D"):
        SOLVERS[solver](torch.rand(3))
    assert issubclass(AssignmentError, MoefuseError) and issubclass(AssignmentError, ValueError)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_input_types(solver):
    for empty in (torch.empty(0, 0), torch.empty(0, 5), torch.empty(4, 0)):
        rows, cols = SOLVERS[solver](empty)
        assert rows.numel() == cols.numel() == 0 and rows.dtype == torch.int64
    listed = [[4, 1, 3], [2, 0, 5], [3, 2, 2]]
    for cost in (listed, np.array(listed), torch.tensor(listed), torch.tensor(listed, dtype=torch.bfloat16),
                 torch.tensor(listed, dtype=torch.float16), torch.tensor(listed).t().contiguous().t()):
        rows, cols = SOLVERS[solver](cost)
        assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    big = torch.tensor([[2**40 + 1, 2**40], [2**40, 2**40 + 3]], dtype=torch.int64)  # exact as float64
    assert SOLVERS[solver](big)[1].tolist() == [1, 0]


def test_float32_solved_in_double():
    # large offsets with fine steps: float32 prices and distances would lose the steps
    generator = torch.Generator().manual_seed(5)
    cost = (1e6 + torch.rand(300, 300, generator=generator, dtype=torch.float64)).float()
    _check_against_scipy(_extension_solver, cost)



def test_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(assignment, "_extension", lambda: (None, "not built here"))
    monkeypatch.setattr(assignment, "_warned", False)
    cost = _costs("uniform64", 12, 9, seed=3)
    with pytest.warns(UserWarning, match="not built here"):
        _check_against_scipy(moefuse.linear_assignment, cost, unique=True)
    with pytest.raises(AssignmentError, match="no complete assignment"):
        moefuse.linear_assignment(torch.full((2, 2), float("inf")))
