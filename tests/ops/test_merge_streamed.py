"""`merge_streamed` gives `merge_tensors`' numbers whatever the piece size, reads its inputs one
piece at a time (releasing each), and casts pieces to the compute dtype; DELLA and filter-wise
Model Stock stream blocks of whole rows."""

from __future__ import annotations

import threading

import pytest
import torch

import moefuse
from moefuse.ops import pieces as pieces_module
from moefuse.ops import rowwise, select
from moefuse.ops.merge import merge_streamed
from tests.helpers import assert_merge_close, method_operands, operand_scale
from tests.ops.test_merge_backends import DTYPES, FAST_BACKENDS, METHOD_PARAMS, _device_for, method_of

ALL_PARAMS = {
    **METHOD_PARAMS,
    "della": dict(weight=[1.0, 0.5, 0.7], density=0.5, epsilon=0.1, seed=5),
    "model_stock_filter_wise": dict(filter_wise=True),
}
# L1 norms or Gram entries add up per piece (or per tile), so they may round differently.
SUMMED = {"dare_ties", "breadcrumbs_ties", "della", "slerp", "model_stock", "nuslerp", "nuslerp_vectors",
          "nuslerp_columns", "multislerp", "karcher", "sce"}
SHAPE = (37, 101)  # 3737 entries: pieces of 64 .. 1024 leave a short last piece


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Tie chunks, level-1 ranges, pieces and row blocks small enough for many of each."""
    monkeypatch.setattr(rowwise, "ROW_BLOCK_ENTRIES", 250)
    monkeypatch.setattr(rowwise, "FUSED_BLOCK_ENTRIES", 250)
    monkeypatch.setattr(rowwise, "GPU_BLOCK_ENTRIES", 250)
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
    method = {"model_stock_filter_wise": "model_stock"}.get(name, method_of(name))
    return (method, *method_operands(method, base, tensors))


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


def _lender(device):
    """(the buffers lent so far, an `allocate` that lends NaN-filled buffers on `device`)."""
    lent = []

    def allocate(entries, dtype):
        lent.append(torch.full((entries,), float("nan"), dtype=dtype, device=device))
        return lent[-1]

    return lent, allocate


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", ["ties", "dare_ties", "linear", "model_stock", "nuslerp_vectors", "nearswap", "sce"])
def test_pieces_are_written_into_the_allocated_buffers(name, backend):
    """With `allocate`, each emitted piece is the buffer it returned, holding the merged entries."""
    device = _device_for(backend)
    base, tensors = _case(torch.bfloat16, device)
    method, base, tensors = _method_inputs(name, base, tensors)
    params = ALL_PARAMS[name]
    lent, allocate = _lender(device)
    pieces = _streamed(base, tensors, method, 1024, allocate=allocate, backend=backend, **params)
    assert len(pieces) == len(lent) == 4  # nuslerp per vector: 4 chunks of (at most) 10 whole rows of 101
    assert all(p.data_ptr() == buffer.data_ptr() and p.numel() == buffer.numel() for p, buffer in zip(pieces, lent))
    expected = moefuse.merge_tensors(base, tensors, method, backend=backend, **params)
    assert torch.equal(torch.cat(pieces).reshape(SHAPE), expected)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("method, params", [("della", ALL_PARAMS["della"]), ("model_stock", dict(filter_wise=True))],
                         ids=["della", "model_stock filter_wise"])
def test_row_blocks_are_written_into_the_allocated_buffers(backend, method, params):
    """Row blocks (merged on worker threads on the CPU) go into the lent buffers too."""
    device = _device_for(backend)
    base, tensors = _case(torch.bfloat16, device)
    lent, allocate = _lender(device)
    blocks = _streamed(base, tensors, method, 1024, allocate=allocate, backend=backend, **params)
    assert len(blocks) == len(lent) > 1
    assert {b.data_ptr() for b in blocks} == {buffer.data_ptr() for buffer in lent}
    expected = moefuse.merge_tensors(base, tensors, method, backend=backend, **params)
    assert torch.equal(torch.cat(blocks).reshape(SHAPE), expected)


def test_nonfinite_input_is_named_after_the_last_piece():
    base, tensors = _case(torch.float32, "cpu")
    tensors[1][-1, -1] = float("nan")
    with pytest.raises(moefuse.MoefuseError, match=r"tensors\[1\] holds 1 NaN"):
        _streamed(base, tensors, "ties", 64, backend="cpu", density=0.5)


ROW_CASES = [  # shape, method, entries per emitted block (blocks of at most 250 entries)
    ((37, 101), "della", 202),  # two rows of 101: blocks off the byte grid, masks ranked in both passes
    ((40, 64), "della", 192),  # three rows of 64: masks kept in bits from the L1 pass for the combine
    ((9, 4, 30), "della", 240),  # ranks run along dim 1: two slices along dim 0
    ((7, 300), "della", 300),  # a row longer than a block is a block of its own
    ((500,), "della", 500),  # one row: the whole tensor
    ((6, 5, 40), "model_stock", 240),  # filter-wise: six filters of 40
    ((), "model_stock", 1),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape, method, block", ROW_CASES, ids=lambda c: str(c))
def test_row_local_methods_stream_blocks_of_whole_rows(shape, method, block, backend):
    """Streamed and in memory, in many blocks (the CPU's thread pool, Triton's one at a time)."""
    device = _device_for(backend)
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=generator).to(torch.bfloat16)
    tensors = [(base.float() + 0.05 * torch.randn(shape, generator=generator)).to(torch.bfloat16) for _ in range(3)]
    params = ALL_PARAMS["della"] if method == "della" else ALL_PARAMS["model_stock_filter_wise"]
    whole = moefuse.merge_tensors(base, tensors, method, backend="reference", **params)
    base, tensors = base.to(device), [t.to(device) for t in tensors]
    released = []
    pieces = _streamed(base, tensors, method, 64, release=lambda a, b: released.append((a, b)), backend=backend,
                       **params)
    n = base.numel()
    assert [p.numel() for p in pieces] == [block] * (n // block) + ([n % block] if n % block else [])
    assert released[-len(pieces):] == [(start, min(n, start + block)) for start in range(0, n, block)]
    streamed = torch.cat(pieces).reshape(shape).cpu()
    assert_merge_close(streamed, whole, scale=operand_scale(base.cpu(), *(t.cpu() for t in tensors)))
    in_memory = moefuse.merge_tensors(base, tensors, method, backend=backend, **params).cpu()
    assert_merge_close(in_memory, whole, scale=operand_scale(base.cpu(), *(t.cpu() for t in tensors)))


@pytest.mark.parametrize("method", ["della", "model_stock"])
def test_one_block_at_a_time_on_the_callers_thread(method, monkeypatch):
    """The GPU layout (one block at a time, run on the caller's thread), forced on the CPU with
    small blocks, gives the reference's numbers and leaves the caller's thread count alone."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(rowwise, "_block_layout", lambda backend, device, fused: (250, 1))
    base, tensors = _case(torch.float32, "cpu", seed=2)
    params = ALL_PARAMS["della"] if method == "della" else ALL_PARAMS["model_stock_filter_wise"]
    whole = moefuse.merge_tensors(base, tensors, method, backend="reference", **params)
    blocks = _streamed(base, tensors, method, 64, backend="reference", **params)
    assert [b.numel() for b in blocks][:2] == [202, 202]  # two rows of 101 per block of 250
    assert_merge_close(torch.cat(blocks).reshape(SHAPE), whole, scale=operand_scale(base, *tensors))
    assert torch.get_num_threads() == threads


def test_pool_workers_leave_the_callers_thread_count():
    """Blocks on pool threads set one torch thread each; the caller's count is restored."""
    threads = torch.get_num_threads()
    base, tensors = _case(torch.float32, "cpu", seed=5)
    _streamed(base, tensors, "model_stock", 64, backend="reference", filter_wise=True)
    assert torch.get_num_threads() == threads
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [threads]


def test_della_blocks_draw_by_flat_index():
    """Without rescaling every block is exact: the same draws and ranks as the whole tensor."""
    base, tensors = _case(torch.float32, "cpu", seed=6)
    params = dict(ALL_PARAMS["della"], rescale=False)
    whole = moefuse.merge_tensors(base, tensors, "della", backend="reference", **params)
    assert torch.equal(torch.cat(_streamed(base, tensors, "della", 64, **params)).reshape(SHAPE), whole)


def test_nonfinite_input_of_a_row_local_method_is_named():
    base, tensors = _case(torch.float32, "cpu")
    tensors[2][0, 0] = float("inf")
    with pytest.raises(moefuse.MoefuseError, match=r"tensors\[2\] holds 1 NaN/Inf"):
        _streamed(base, tensors, "model_stock", 64, filter_wise=True)
