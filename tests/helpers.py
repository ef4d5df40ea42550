"""Shared test helpers: devices, peers, and dtype-aware comparisons."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def require_peer(module: str):
    """Import a peer package (mergekit, gguf, scipy). The README's setup installs them, so a
    missing peer is an error, unless MOEFUSE_ALLOW_MISSING_PEERS=1 turns it into a skip."""
    if os.environ.get("MOEFUSE_ALLOW_MISSING_PEERS") == "1":
        return pytest.importorskip(module)
    return importlib.import_module(module)


def missing_peer(what: str) -> None:
    """Fail (or, with MOEFUSE_ALLOW_MISSING_PEERS=1, skip) because `what` is not installed."""
    message = f"{what} is not installed; run the README's setup command (bash scripts/setup.sh)"
    if os.environ.get("MOEFUSE_ALLOW_MISSING_PEERS") == "1":
        pytest.skip(message)
    pytest.fail(message)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at each |value| (smallest normal's ulp near 0)."""
    tiny = torch.finfo(dtype).tiny
    _, exponent = torch.frexp(values.double().abs().clamp(min=tiny))
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - 1 - MANTISSA_BITS[dtype])


def operand_scale(*tensors: torch.Tensor) -> torch.Tensor:
    """Entrywise max |value| over the operands of a merge (base and inputs)."""
    return torch.stack([t.double().abs() for t in tensors]).amax(dim=0)


def _report(bad: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, exclude, how: str) -> None:
    """Raise naming how many entries (outside `exclude`) are bad, and the first few of them."""
    if exclude is not None:
        bad = bad & ~exclude.reshape(-1)
    if bad.any():
        index = torch.nonzero(bad).reshape(-1)[:5]
        raise AssertionError(
            f"{int(bad.sum())} of {actual.numel()} entries differ {how}; first at {index.tolist()}: "
            f"actual {actual[index].tolist()} expected {expected[index].tolist()}"
        )


def assert_close_ulp(actual: torch.Tensor, expected: torch.Tensor, ulps: float, exclude=None, scale=None) -> None:
    """|actual - expected| <= ulps * ulp(s) entrywise in the dtype of `expected`, where s is the
    larger of |actual|, |expected| and `scale` (the operands' magnitude: a difference of nearly
    equal operands carries their rounding error). Entries where `exclude` is True are skipped."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double().reshape(-1), expected.double().reshape(-1)
    magnitude = torch.maximum(a.abs(), e.abs())
    if scale is not None:
        magnitude = torch.maximum(magnitude, scale.double().reshape(-1))
    bound = ulps * ulp(magnitude, expected.dtype)
    bad = ((a - e).abs() > bound) & ~(torch.isnan(a) & torch.isnan(e))
    _report(bad, a, e, exclude, f"by more than {ulps} ulp")


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6, exclude=None) -> None:
    """|actual - expected| <= rel * (|expected| + max|expected|): 1e-6 relative to the entry,
    with the tensor's scale as the floor for entries near zero."""
    a, e = actual.double().reshape(-1), expected.double().reshape(-1)
    scale = e.abs().max().item() if e.numel() else 0.0
    bad = (a - e).abs() > rel * (e.abs() + scale)
    _report(bad, a, e, exclude, f"beyond {rel} relative")


def assert_merge_close(actual: torch.Tensor, expected: torch.Tensor, exclude=None, ulps: float = 1, scale=None) -> None:
    """fp32: 1e-6 relative; bf16/fp16: within `ulps` ulp of the output dtype (see
    `assert_close_ulp` for `scale`)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    if expected.dtype == torch.float32:
        assert_close_fp32(actual, expected, exclude=exclude)
    else:
        assert_close_ulp(actual, expected, ulps, exclude=exclude, scale=scale)


def method_operands(method: str, base, tensors):
    """(base, tensors) as `method` takes them: the base where it has a base role (else it is one more
    input for karcher and left out for linear and passthrough), at most `max_models` models."""
    from moefuse.methods import get_method
    from moefuse.methods.base import BASE_AS_INPUT

    spec = get_method(method)
    if spec.base == BASE_AS_INPUT:
        tensors = [base, *tensors]
    tensors = list(tensors) if spec.max_models is None else list(tensors)[:spec.max_models]
    return (base if spec.uses_base else None), tensors
