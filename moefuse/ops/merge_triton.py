"""Triton backend of the merge engine (kernels in `moefuse.kernels.merge_gta`).

Works on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 is set before Triton is
imported. Semantics are those of `moefuse.ops.merge_reference`; the GTA merge runs the shared
pipeline of `moefuse.ops.gta_pipeline` (selection, optional L1 norms, one fused pass).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, List, Optional, Sequence, Tuple

import torch

from moefuse.errors import MergeInputError
from moefuse.kernels import merge_gta as kernels
from moefuse.ops.merge_reference import model_stock_t
from moefuse.ops.select import LEVEL1_BINS, LEVEL2_BINS, level1_shift


def _prepared(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors made contiguous (no copy when they are), after checking where they live: the
    interpreter reads host memory only, compiled kernels read device memory only."""
    for tensor in tensors:
        on_cpu = tensor.device.type == "cpu"
        if kernels.interpreted() and not on_cpu:
            raise MergeInputError(
                f"the Triton backend runs in the interpreter (TRITON_INTERPRET=1), which needs CPU "
                f"tensors, got {tensor.device}; unset TRITON_INTERPRET or move the tensors to the CPU"
            )
        if on_cpu and not kernels.interpreted():
            raise MergeInputError(
                "the Triton backend needs GPU tensors (CPU tensors only with TRITON_INTERPRET=1 set "
                "before triton is imported); use backend='cpu' or 'auto' for CPU tensors"
            )
    return [tensor.contiguous() for tensor in tensors]


def _device_of(tensor: torch.Tensor) -> ContextManager:
    """Make the tensor's GPU current: Triton launches on the current CUDA device."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def count_nonfinite(tensors: Sequence[torch.Tensor]) -> List[int]:
    """Number of NaN/Inf entries of each tensor."""
    tensors = _prepared(tensors)
    if not tensors:
        return []
    with _device_of(tensors[0]):
        return kernels.count_nonfinite(tensors).tolist()


def histogram_level1(base: torch.Tensor, inputs: Sequence[torch.Tensor], models: Sequence[int],
                     range_size: int) -> torch.Tensor:
    """int64 [len(models), 32768]: row q counts key >> level1_shift over model models[q] (one
    histogram for the whole slice: no per-range counts, so `range_size` is not used)."""
    base, *rows = _prepared([base] + [inputs[i] for i in models])
    with _device_of(base):
        return kernels.histogram(base, rows, level1_shift(base.dtype), LEVEL1_BINS)


def histogram_level2(base: torch.Tensor, inputs: Sequence[torch.Tensor], models: Sequence[int],
                     prefixes: Sequence[int]) -> torch.Tensor:
    """int64 [len(models), 65536] (fp32 only): row q counts key & 0xFFFF over the entries of
    model models[q] with key >> 16 == prefixes[q]."""
    base, *rows = _prepared([base] + [inputs[i] for i in models])
    with _device_of(base):
        return kernels.histogram(base, rows, 16, LEVEL2_BINS, prefixes)


def chunk_counts(base: torch.Tensor, inputs: Sequence[torch.Tensor], models: Sequence[int],
                 keys: Sequence[int], chunk: int) -> torch.Tensor:
    """int64 [len(models), ceil(n / chunk)]: [q, c] counts the j in [c chunk, (c + 1) chunk) of
    model models[q] with key_j == keys[q]."""
    base, *rows = _prepared([base] + [inputs[i] for i in models])
    with _device_of(base):
        return kernels.chunk_counts(base, rows, keys, chunk)


RECORDS_RANDOM_KEEPS = True  # l1_norms records (or replays) random keep decisions; fused_gta replays them
# Row-local merges (`moefuse.ops.rowwise`) run one block at a time on the caller's thread: the GPU
# runs one block's kernels at a time anyway (and Triton's interpreter is not thread-safe).
ONE_BLOCK_AT_A_TIME = True
GRAM_PARTIAL_ENTRIES = 1 << 23  # fp64 partial Gram sums held at a time by model_stock_rows (64 MB)


def l1_norms(base: torch.Tensor, inputs: Sequence[torch.Tensor], rules: torch.Tensor, seed: int, offset: int,
             random_keeps: Sequence[torch.Tensor] = (), replay: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 [N] pair (CPU): sum_j |d_ij| and sum_j keep_ij |d_ij| (entry j of the slice has
    flat index offset + j). Given `random_keeps` (a uint8 buffer of ceil(len / 8) bytes per input
    on the tensors' device), the random keep decisions are recorded there (bit j % 8 of byte
    j / 8), or with `replay` read from there."""
    base, *inputs = _prepared([base, *inputs])
    with _device_of(base):
        totals = kernels.l1_norm_partials(base, inputs, rules, seed, offset, random_keeps, replay).sum(dim=0).cpu()
    return totals[:, 0].contiguous(), totals[:, 1].contiguous()


def fused_gta(base: torch.Tensor, inputs: Sequence[torch.Tensor], rules: torch.Tensor, seed: int,
              coefficients: Sequence[float], weights: Sequence[float], consensus: bool, normalize: bool,
              weight_sum: float, lam: float, out_dtype: torch.dtype, offset: int,
              random_keeps: Sequence[torch.Tensor] = (), out: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, List[int]]:
    """out = base + lam * M (/ W if normalize), M and W as in `moefuse.methods.gta`, with
    D_i = keep_i * coefficients[i] * d_i; and the NaN/Inf counts of the base and each input.
    Entry j of the slice has flat index offset + j; random keep decisions are replayed from
    `random_keeps` where given (as recorded by `l1_norms`). Written into `out` where given."""
    base, *inputs = _prepared([base, *inputs])
    with _device_of(base):
        out, counts = kernels.fused_gta(base, inputs, rules, seed, coefficients, weights, consensus, normalize,
                                        weight_sum, lam, out_dtype, offset, random_keeps, out)
    return out, counts.tolist()


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float], out_dtype: torch.dtype,
                 out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[int]]:
    """sum_k c_k T_k accumulated in fp32 from 0 in input order, cast to out_dtype (into `out`
    where given); and the NaN/Inf count of each T_k."""
    tensors = _prepared(tensors)
    with _device_of(tensors[0]):
        out, counts = kernels.weighted_sum(tensors, coefficients, out_dtype, out=out)
    return out, counts.tolist()


def gram(tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 CPU [K, K]: G[a, b] = <T_a - base, T_b - base> (<T_a, T_b> without base)."""
    if not tensors:
        return torch.zeros(0, 0, dtype=torch.float64)
    tensors = _prepared(tensors)
    base = _prepared([base])[0] if base is not None else None
    with _device_of(tensors[0]):
        upper = kernels.gram_partials(tensors, base).sum(dim=(0, 1)).cpu()
    return upper + upper.triu(1).T


def model_stock_rows(base: torch.Tensor, inputs: Sequence[torch.Tensor], row_length: int,
                     out_dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[int]]:
    """Filter-wise Model Stock of whole rows of row_length entries: each row's Gram matrix of task
    vectors (exact fp64 products, fp64 sums), its factor t (`model_stock_t`), then
    out = (1 - t) base + sum_i (t / N) x_i in fp32 (into `out` where given); and the NaN/Inf
    counts of the base and each input. The Gram tiles are summed for GRAM_PARTIAL_ENTRIES fp64
    values at a time (short rows would otherwise take far more memory in partial sums than in data)."""
    base, *inputs = _prepared([base, *inputs])
    rows = base.numel() // row_length
    partials_per_row = len(inputs) ** 2 * -(-row_length // kernels.BLOCK)
    chunk = max(1, GRAM_PARTIAL_ENTRIES // partials_per_row) * row_length
    with _device_of(base):
        t = torch.empty(rows, dtype=torch.float32, device=base.device)
        for start in range(0, base.numel(), chunk):
            upper = kernels.gram_partials([x[start:start + chunk] for x in inputs], base[start:start + chunk],
                                          row_length).sum(dim=1)
            t[start // row_length:start // row_length + upper.shape[0]] = model_stock_t(upper)
        coefficients = torch.stack([1 - t] + [t / len(inputs)] * len(inputs), dim=1).reshape(rows, 1 + len(inputs))
        out, counts = kernels.weighted_sum([base, *inputs], coefficients.contiguous(), out_dtype, row_length, out)
    return out, counts.tolist()


def della_keep(base: torch.Tensor, x: torch.Tensor, probability: torch.Tensor, seed: int, stream: int,
               offset: int) -> torch.Tensor:
    """DELLA's keep mask of input `stream`, packed (entry j in bit j % 8 of byte j / 8): rows of
    probability.numel() entries; entry j (flat index offset + j) of ascending |d| rank r in its row
    (ties by index) is kept iff uniform(philox(seed, stream, offset + j)) < probability[r]."""
    base, x = _prepared([base, x])
    row_length = probability.numel()
    with _device_of(base):
        # |d| as its bit pattern in d's own 16- or 32-bit dtype: non-negative, ordered like |d|
        # (`magnitude_keys` without the widening to int64, which would double the sort's work)
        delta = (x - base).abs()
        keys = delta.view(torch.int32 if delta.element_size() == 4 else torch.int16).reshape(-1, row_length)
        order = torch.sort(keys, dim=1, stable=True).indices
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(row_length, device=order.device).expand_as(order))
        # uniform = (draw >> 8) / 2^24 < p  <=>  draw >> 8 < ceil(p 2^24)  (p 2^24 is exact in fp64)
        thresholds = torch.ceil(probability.to(base.device, torch.float64) * (1 << 24)).to(torch.int64)
        return kernels.della_bits(ranks.reshape(-1), thresholds, seed, stream, offset)
