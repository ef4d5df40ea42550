"""The merged pieces' buffers are lent by `_PiecePool` and reused once written."""

from __future__ import annotations

import torch

from moefuse.merge import run


def test_written_buffers_are_lent_again(monkeypatch):
    monkeypatch.setattr(run, "PIECE_ENTRIES", 64)
    pool = run._PiecePool()
    first = pool.take(64, torch.bfloat16)
    second = pool.take(10, torch.bfloat16)  # a short last piece: a view of a whole buffer
    assert second.numel() == 10 and first.data_ptr() != second.data_ptr()
    pool.give_back(second)
    assert pool.take(64, torch.bfloat16).data_ptr() == second.data_ptr()
    assert pool.take(64, torch.float32).dtype == torch.float32  # each dtype has buffers of its own
    pool.give_back(torch.zeros(64, dtype=torch.bfloat16))  # not lent by the pool: ignored
    assert pool.take(64, torch.bfloat16).data_ptr() not in (first.data_ptr(), second.data_ptr())
    large = pool.take(65, torch.bfloat16)  # larger than a piece: a buffer of its own, never kept
    assert large.numel() == 65
    pool.give_back(large)
    assert pool.take(64, torch.bfloat16).data_ptr() != large.data_ptr()
