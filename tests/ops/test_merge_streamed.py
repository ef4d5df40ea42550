"""`merge_streamed` gives `merge_tensors`' numbers whatever the piece size, reads its inputs one
piece at a time (releasing each), and casts pieces to the compute dtype."""

from __future__ import annotations

import pytest
import torch

import moefuse
from moefuse.ops import pieces as pieces_module
from moefuse.ops import select
from moefuse.ops.merge import merge_streamed
from tests.helpers import assert_merge_close, operand_scale
from tests.ops.test_merge_backends import DTYPES, FAST_BACKENDS, METHOD_PARAMS, _device_for

ALL_PARAMS = {
    **METHOD_PARAMS,
    "della": dict(weight=[1.0, 0.5, 0.7], density=0.5, epsilon=0.1, seed=5),
    "model_stock_filter_wise": dict(filter_wise=True),
}
SUMMED = {"dare_ties", "breadcrumbs_ties", "slerp", "model_stock"}  # L1 norms or Gram entries add up per piece
SHAPE = (37, 101)  # 3737 entries: pieces of 64 .. 1024 leave a short last piece


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Tie chunks, level-1 ranges and pieces small enough for many of each."""
    monkeypatch.setattr(pieces_module, "TIE_CHUNK", 64)
    monkeypatch.setattr(select, "TIE_CHUNK", 64)
    monkeypatch.setattr(select, "MIN_RANGE", 64)


def _case(dtype, device, seed=0):
    """Quantized deltas: many equal magnitudes straddle every rank cut."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=generator)
    tensors = [base + 0.01 * torch.randint(-4, 5, SHAPE, generator=generator) for _ in range(3)]
    return base.to(dtype).to(device), [t.to(dtype).to(device) for t in tensors]


def _method_inputs(name, base, tensors):
    method = {"model_stock_filter_wise": "model_stock"}.get(name, name)
    if method == "linear":
        return method, None, tensors
    if method == "slerp":
        return method, base, tensors[:1]
    return method, base, tensors


def _streamed(base, tensors, method, piece_size, **kwargs):
    pieces = []
    merge_streamed(base, tensors, method, pieces.append, piece_size=piece_size, **kwargs)
    return pieces


@pytest.mark.parametrize("piece_size", [64, 1000], ids=lambda p: f"piece{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", list(ALL_PARAMS))
def test_streamed_equals_whole(name, backend, dtype, piece_size):
    device = _device_for(backend)
    method, base, tensors = _method_inputs(name, *_case(dtype, device))
    params = ALL_PARAMS[name]
    whole = moefuse.merge_tensors(base, tensors, method, backend=backend, **params)
    pieces = _streamed(base, tensors, method, piece_size, backend=backend, **params)
    streamed = torch.cat([p.reshape(-1) for p in pieces]).reshape(whole.shape)
    assert streamed.dtype == whole.dtype
    if name in SUMMED:  # a piecewise sum of fp32 tile sums may round differently
        operands = ([base] if base is not None else []) + tensors
        assert_merge_close(streamed.cpu(), whole.cpu(), scale=operand_scale(*(t.cpu() for t in operands)))
    else:
        assert torch.equal(streamed, whole), f"{(streamed != whole).sum()} entries differ"


def test_pieces_cover_the_tensor_in_order_and_are_released():
    base, tensors = _case(torch.bfloat16, "cpu")
    released = []
    pieces = _streamed(base, tensors, "ties", 100, release=lambda a, b: released.append((a, b)),
                       backend="cpu", density=0.4)
    n = base.numel()
    assert [p.numel() for p in pieces] == [128] * (n // 128) + [n % 128]  # rounded up to a power of two
    walk = [(start, min(n, start + 128)) for start in range(0, n, 128)]
    assert released[:len(walk)] == walk  # the selection pass, then the ties' scans, then the fused pass
    assert released[-len(walk):] == walk


def test_pieces_are_cast_to_the_compute_dtype():
    base, tensors = _case(torch.bfloat16, "cpu", seed=4)
    pieces = _streamed(base, tensors, "ties", 256, compute_dtype=torch.float32, backend="cpu", density=0.4)
    assert all(p.dtype == torch.float32 for p in pieces)
    expected = moefuse.merge_tensors(base.float(), [t.float() for t in tensors], "ties", backend="cpu", density=0.4)
    assert torch.equal(torch.cat(pieces).reshape(SHAPE), expected)


def test_nonfinite_input_is_named_after_the_last_piece():
    base, tensors = _case(torch.float32, "cpu")
    tensors[1][-1, -1] = float("nan")
    with pytest.raises(moefuse.MoefuseError, match=r"tensors\[1\] holds 1 NaN"):
        _streamed(base, tensors, "ties", 64, backend="cpu", density=0.5)
