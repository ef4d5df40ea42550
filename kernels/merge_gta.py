"""Triton kernels of the merge engine, each with the launcher that sizes its grid.

All kernels read flat, contiguous tensors with 64-bit offsets. A variable number of same-shaped
inputs is passed as a *pointer table*: an int64 device tensor of their `data_ptr()`s, loaded and
cast back to a typed pointer inside the kernel, so no input is ever copied or stacked.

Per-entry definitions shared by every kernel (see `moefuse.ops.merge_reference`):

    d    = round_to_input_dtype(fp32(x) - fp32(base))       the task-vector entry
    key  = IEEE bit pattern of |d| in the input dtype       orders like |d|
    keep = (key, j) among ranks [lo, hi) and philox(seed, i, j) < random threshold

Rounding is done with integer arithmetic for bfloat16, because Triton's interpreter truncates
fp32 -> bf16 and mishandles bf16 subnormals; on the GPU both forms give the same bits.

The launchers do no model or file logic: they allocate outputs, pick BLOCK/num_warps and launch.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements per program: 8 per thread with 8 warps (16-byte loads of 16-bit dtypes)
# No fma contraction: every product and sum rounds separately, exactly as the PyTorch reference.
_LAUNCH = dict(num_warps=8, enable_fp_fusion=False)

_ALWAYS = tl.constexpr(1 << 32)  # random threshold meaning "no random draw"
# Where random keep decisions come from (`_keep`): drawn, replayed from bit buffers, or drawn and
# recorded into them.
_DRAW, _REPLAY, _RECORD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(BLOCK: tl.constexpr):
    """This program's 64-bit flat offsets along grid axis 0."""
    return tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _to_f32(x):
    """Exact widening to fp32 (bf16 by shifting its bits into the high half)."""
    if x.dtype == tl.bfloat16:
        wide = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        wide = x.to(tl.float32)
    return wide


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even (bf16 as torch does: NaN becomes 0x7FC0)."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        high = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        high = tl.where(v != v, 0x7FC0, high)
        rounded = high.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = v.to(DTYPE)
    return rounded


@triton.jit
def _load_f32(ptr, offs, mask):
    """Tile `offs` of a tensor, widened to fp32 (0 where masked)."""
    return _to_f32(tl.load(ptr + offs, mask=mask, other=0.0))


@triton.jit
def _load_tile(table_ptr, index, offs, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tile `offs` of the DTYPE tensor whose data pointer is entry `index` of the pointer table
    (ALIGNED: every pointer of the table is 16-byte aligned, allowing vector loads)."""
    ptr = tl.load(table_ptr + index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _delta(x, base_f32):
    """x - base computed in fp32 and rounded to x's dtype (what torch's `x - base` gives)."""
    return _round_to(_to_f32(x) - base_f32, x.dtype)


@triton.jit
def _delta_and_key(x, base_f32):
    """(d as fp32, int64 magnitude key of d in x's dtype)."""
    d = _delta(x, base_f32)
    if x.dtype == tl.float32:
        key = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        key = d.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return _to_f32(d), key.to(tl.int64)


@triton.jit
def _draw(seed, model, offs):
    """Word j % 4 of Philox-4x32-10 with key `seed` and counter (q lo, q hi, model, 0), q = j // 4
    (moefuse/ops/philox.py)."""
    block = offs >> 2
    low = block.to(tl.uint32)
    zero = low * 0
    w0, w1, w2, w3 = tl.random.philox(seed, low, (block >> 32).to(tl.uint32), zero + model, zero)
    word = offs & 3
    return tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))


@triton.jit
def _bit_buffer(table_ptr, index):
    """The uint8 bit buffer whose data pointer is entry `index` of a pointer table."""
    return tl.load(table_ptr + index).to(tl.pointer_type(tl.uint8))


@triton.jit
def _store_bits(bits_ptr, flags, n, BLOCK: tl.constexpr):
    """Pack this program's BLOCK flags (entries offs = _tile(BLOCK)) into its BLOCK / 8 bytes of
    bits_ptr: entry j in bit j % 8 of byte j / 8, for the ceil(n / 8) bytes of n entries."""
    bytes_ = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    eights = tl.reshape(flags.to(tl.int32), [BLOCK // 8, 8])
    packed = tl.sum(eights << tl.arange(0, 8)[None, :], axis=1)
    tl.store(bits_ptr + bytes_, packed.to(tl.uint8), mask=bytes_ * 8 < n)  # int64: n + 7 could wrap in int32


@triton.jit
def _keep(key, offs, offset, mask, rules_ptr, model, seed, keeps_table, n, KEEPS: tl.constexpr, BLOCK: tl.constexpr):
    """Keep mask of model `model` from its rules row (t_hi, cut_hi, t_lo, cut_lo, threshold) for
    entries offs of the slice (flat indices offs + offset). The random decision is drawn
    (KEEPS == DRAW), replayed from bit buffer `model` of keeps_table (REPLAY), or drawn and
    recorded there (RECORD; programs along grid axis 0 tile the slice)."""
    row = rules_ptr + model * 5
    t_hi = tl.load(row)
    cut_hi = tl.load(row + 1)
    t_lo = tl.load(row + 2)
    cut_lo = tl.load(row + 3)
    threshold = tl.load(row + 4)
    index = offs + offset
    in_hi = (key > t_hi) | ((key == t_hi) & (index < cut_hi))
    in_lo = (key > t_lo) | ((key == t_lo) & (index < cut_lo))
    keep = in_hi & ~in_lo
    if threshold < _ALWAYS:
        if KEEPS == _REPLAY:
            byte = tl.load(_bit_buffer(keeps_table, model) + (offs >> 3), mask=mask, other=0).to(tl.int32)
            random = ((byte >> (offs & 7).to(tl.int32)) & 1) != 0
        else:
            random = _draw(seed, model, index).to(tl.int64) < threshold
            if KEEPS == _RECORD:
                _store_bits(_bit_buffer(keeps_table, model), random & mask, n, BLOCK)
        keep = keep & random
    return keep


@triton.jit
def _count_nonfinite(x, count_ptr):
    """count += number of NaN/Inf entries (all-ones exponent) of the tile x."""
    exponent = _to_f32(x).to(tl.int32, bitcast=True) & 0x7F800000
    tl.atomic_add(count_ptr, tl.sum((exponent == 0x7F800000).to(tl.int64)), sem="relaxed")


@triton.jit
def _contribution(table_ptr, rules_ptr, coef_ptr, keeps_table, model, base_f32, offs, offset, mask, n, seed,
                  DTYPE: tl.constexpr, ALIGNED: tl.constexpr, KEEPS: tl.constexpr, BLOCK: tl.constexpr, count_ptr,
                  COUNT: tl.constexpr):
    """D_i = keep_i ? c_i * d_i : 0 in fp32 (with COUNT, also count x_i's NaN/Inf at count_ptr);
    the rules see flat indices offs + offset (random decisions as `_keep`'s KEEPS)."""
    x = _load_tile(table_ptr, model, offs, mask, DTYPE, ALIGNED)
    if COUNT:
        _count_nonfinite(x, count_ptr)
    d, key = _delta_and_key(x, base_f32)
    keep = _keep(key, offs, offset, mask, rules_ptr, model, seed, keeps_table, n, KEEPS, BLOCK)
    return tl.where(keep, d * tl.load(coef_ptr + model), 0.0)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _nonfinite_kernel(x_ptr, count_ptr, n, BLOCK: tl.constexpr):
    """count += number of NaN/Inf entries in this tile."""
    offs = _tile(BLOCK)
    _count_nonfinite(tl.load(x_ptr + offs, mask=offs < n, other=0.0), count_ptr)


@triton.jit
def _histogram_kernel(base_ptr, table_ptr, prefix_ptr, hist_ptr, n, SHIFT: tl.constexpr, LEVEL2: tl.constexpr,
                      NUM_BINS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Row q (grid axis 1): level 1 counts key >> SHIFT; level 2 counts key & 0xFFFF among
    keys whose key >> 16 equals prefix[q]."""
    row = tl.program_id(1)
    offs = _tile(BLOCK)
    mask = offs < n
    base = _load_f32(base_ptr, offs, mask)
    x = _load_tile(table_ptr, row, offs, mask, base_ptr.dtype.element_ty, ALIGNED)
    _, key = _delta_and_key(x, base)
    if LEVEL2:
        mask = mask & ((key >> 16) == tl.load(prefix_ptr + row))
        bins = key & 0xFFFF
    else:
        bins = key >> SHIFT
    ones = tl.full([BLOCK], 1, tl.int64)
    tl.atomic_add(hist_ptr + row * NUM_BINS + bins, ones, mask=mask, sem="relaxed")


@triton.jit
def _chunk_count_kernel(base_ptr, table_ptr, key_ptr, count_ptr, n, chunk, num_chunks, ALIGNED: tl.constexpr,
                        BLOCK: tl.constexpr):
    """count[q, c] = #{j in chunk c : key_j of row q's model == key[q]} (grid: chunks x rows)."""
    row = tl.program_id(1)
    start = tl.program_id(0).to(tl.int64) * chunk
    target = tl.load(key_ptr + row)
    hits = tl.zeros([BLOCK], tl.int64)
    for step in range(0, chunk, BLOCK):
        local = step + tl.arange(0, BLOCK)
        offs = start + local
        mask = (offs < n) & (local < chunk)
        base = _load_f32(base_ptr, offs, mask)
        x = _load_tile(table_ptr, row, offs, mask, base_ptr.dtype.element_ty, ALIGNED)
        _, key = _delta_and_key(x, base)
        hits += (mask & (key == target)).to(tl.int64)
    tl.store(count_ptr + row * num_chunks + tl.program_id(0), tl.sum(hits))


@triton.jit
def _l1_norm_kernel(base_ptr, table_ptr, rules_ptr, keeps_table, partial_ptr, n, num_models, seed, offset,
                    ALIGNED: tl.constexpr, KEEPS: tl.constexpr, BLOCK: tl.constexpr):
    """partial[tile, i] = (sum_j |d_ij|, sum_j keep_ij |d_ij|) over this tile, in fp64; the rules
    see flat indices offs + offset (random decisions as `_keep`'s KEEPS)."""
    offs = _tile(BLOCK)
    mask = offs < n
    base = _load_f32(base_ptr, offs, mask)
    out = partial_ptr + tl.program_id(0).to(tl.int64) * num_models * 2
    for i in range(num_models):
        x = _load_tile(table_ptr, i, offs, mask, base_ptr.dtype.element_ty, ALIGNED)
        d, key = _delta_and_key(x, base)
        magnitude = tl.abs(d).to(tl.float64)
        keep = _keep(key, offs, offset, mask, rules_ptr, i, seed, keeps_table, n, KEEPS, BLOCK)
        tl.store(out + 2 * i, tl.sum(magnitude))
        tl.store(out + 2 * i + 1, tl.sum(tl.where(keep, magnitude, 0.0)))


@triton.jit
def _fused_gta_kernel(base_ptr, table_ptr, rules_ptr, keeps_table, coef_ptr, weight_ptr, out_ptr, count_ptr, n,
                      num_models, seed, offset, weight_sum, lam, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
                      ALIGNED: tl.constexpr, KEEPS: tl.constexpr, BLOCK: tl.constexpr):
    """out = base + lam * M / W with M, W from the kept, weighted deltas (module docstring);
    count[0] += NaN/Inf entries of the base, count[1 + i] those of input i. KEEPS: DRAW, or REPLAY
    the random decisions from keeps_table."""
    offs = _tile(BLOCK)
    mask = offs < n
    DTYPE: tl.constexpr = base_ptr.dtype.element_ty
    raw_base = tl.load(base_ptr + offs, mask=mask, other=0.0)
    _count_nonfinite(raw_base, count_ptr)
    base = _to_f32(raw_base)
    total = tl.zeros([BLOCK], tl.float32)
    for i in range(num_models):
        total += _contribution(table_ptr, rules_ptr, coef_ptr, keeps_table, i, base, offs, offset, mask, n, seed,
                               DTYPE, ALIGNED, KEEPS, BLOCK, count_ptr + 1 + i, True)
    if CONSENSUS:
        positive = total >= 0
        mixed = tl.zeros([BLOCK], tl.float32)
        divisor = tl.zeros([BLOCK], tl.float32)
        for i in range(num_models):
            D = _contribution(table_ptr, rules_ptr, coef_ptr, keeps_table, i, base, offs, offset, mask, n, seed,
                              DTYPE, ALIGNED, KEEPS, BLOCK, count_ptr, False)
            agree = ((D > 0) & positive) | ((D < 0) & ~positive)
            mixed += D * agree.to(tl.float32)  # NaN propagates, as in the reference
            divisor += tl.where(agree, tl.load(weight_ptr + i), 0.0)
        divisor = tl.where(divisor == 0, 1.0, divisor)
    else:
        mixed = total
        divisor = weight_sum
    if NORMALIZE:
        mixed = tl.math.div_rn(mixed, divisor)  # IEEE division, not the approximate one
    merged = base + mixed * lam
    tl.store(out_ptr + offs, _round_to(merged, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_sum_kernel(table_ptr, coef_ptr, out_ptr, count_ptr, n, count, row_length, DTYPE: tl.constexpr,
                         PER_ROW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum_k c_k T_k, accumulated in fp32 from 0 in table order; count[k] += NaN/Inf of T_k.
    PER_ROW: each row of row_length entries has coefficients of its own, coef[row, k]."""
    offs = _tile(BLOCK)
    mask = offs < n
    if PER_ROW:
        coef_row = coef_ptr + (offs // row_length) * count
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(count):
        x = _load_tile(table_ptr, k, offs, mask, DTYPE, ALIGNED)
        _count_nonfinite(x, count_ptr + k)
        if PER_ROW:
            acc += _to_f32(x) * tl.load(coef_row + k, mask=mask, other=0.0)
        else:
            acc += _to_f32(x) * tl.load(coef_ptr + k)
    tl.store(out_ptr + offs, _round_to(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gram_kernel(base_ptr, table_ptr, partial_ptr, row_length, tiles_per_row, count, HAS_BASE: tl.constexpr,
                 DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """partial[tile, a, b] = <T_a - base, T_b - base> over this tile for a <= b, from exact fp64
    products summed in fp64 (base 0 without HAS_BASE: x - 0 rounds to x). The tensors are rows of
    row_length entries, each cut into tiles_per_row tiles: tile p covers tile p % tiles_per_row
    of row p // tiles_per_row."""
    tile = tl.program_id(0)
    in_row = (tile % tiles_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = in_row < row_length
    offs = (tile // tiles_per_row).to(tl.int64) * row_length + in_row
    out = partial_ptr + tile.to(tl.int64) * count * count
    if HAS_BASE:
        base = _load_f32(base_ptr, offs, mask)
    else:
        base = tl.zeros([BLOCK], tl.float32)
    for a in range(count):
        left = _to_f32(_delta(_load_tile(table_ptr, a, offs, mask, DTYPE, ALIGNED), base)).to(tl.float64)
        for b in range(a, count):
            right = _to_f32(_delta(_load_tile(table_ptr, b, offs, mask, DTYPE, ALIGNED), base)).to(tl.float64)
            tl.store(out + a * count + b, tl.sum(left * right))


@triton.jit
def _della_bits_kernel(rank_ptr, threshold_ptr, bits_ptr, n, seed, model, offset, BLOCK: tl.constexpr):
    """DELLA's keep bits: entry j (flat index offset + j) of ascending row rank r is kept iff
    philox(seed, model, offset + j) >> 8 < threshold[r], packed as `_store_bits`."""
    offs = _tile(BLOCK)
    mask = offs < n
    rank = tl.load(rank_ptr + offs, mask=mask, other=0)
    threshold = tl.load(threshold_ptr + rank, mask=mask, other=0)
    draw = (_draw(seed, model, offs + offset) >> 8).to(tl.int64)
    _store_bits(bits_ptr, (draw < threshold) & mask, n, BLOCK)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """True when these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_fused_gta_kernel, triton.JITFunction)


def _pointer_table(tensors: Sequence[torch.Tensor], device: torch.device) -> Tuple[torch.Tensor, bool]:
    """(int64 tensor of the tensors' data pointers, whether all are 16-byte aligned). The tensors
    must be contiguous and stay alive until the kernel has run."""
    pointers = [t.data_ptr() for t in tensors]
    return torch.tensor(pointers, dtype=torch.int64, device=device), all(p % 16 == 0 for p in pointers)


def _output_for(like: torch.Tensor, dtype: torch.dtype, out: Optional[torch.Tensor]) -> torch.Tensor:
    """`out` viewed in like's shape after checking it, or a new tensor."""
    if out is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if out.dtype != dtype or out.numel() != like.numel() or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out: need a contiguous {dtype} tensor of {like.numel()} entries on {like.device}, got "
                         f"{out.dtype} [{out.numel()}] on {out.device}")
    return out.view(like.shape)


def _blocks(n: int) -> int:
    return triton.cdiv(n, BLOCK)


def count_nonfinite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 [K] on the tensors' device: NaN/Inf entries of each (contiguous, non-empty list) tensor."""
    counts = torch.zeros(len(tensors), dtype=torch.int64, device=tensors[0].device)
    for k, tensor in enumerate(tensors):
        if tensor.numel():
            _nonfinite_kernel[(_blocks(tensor.numel()),)](tensor, counts[k:], tensor.numel(), BLOCK=BLOCK, **_LAUNCH)
    return counts


def histogram(base: torch.Tensor, rows: Sequence[torch.Tensor], shift: int, num_bins: int,
              prefixes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """int64 [len(rows), num_bins]: per row, histogram of key >> shift, or (with `prefixes`) of
    key & 0xFFFF over the keys with key >> 16 == prefixes[row]."""
    hist = torch.zeros(len(rows), num_bins, dtype=torch.int64, device=base.device)
    n = base.numel()
    if n and rows:
        level2 = prefixes is not None
        prefix = torch.tensor(list(prefixes) if level2 else [0], dtype=torch.int64, device=base.device)
        table, aligned = _pointer_table(rows, base.device)
        _histogram_kernel[(_blocks(n), len(rows))](
            base, table, prefix, hist, n, SHIFT=shift, LEVEL2=level2, NUM_BINS=num_bins, ALIGNED=aligned,
            BLOCK=BLOCK, **_LAUNCH,
        )
    return hist


def chunk_counts(base: torch.Tensor, rows: Sequence[torch.Tensor], keys: Sequence[int], chunk: int) -> torch.Tensor:
    """int64 [len(rows), ceil(n / chunk)]: per row and chunk, entries whose key equals keys[row]."""
    n = base.numel()
    num_chunks = triton.cdiv(n, chunk)
    counts = torch.zeros(len(rows), num_chunks, dtype=torch.int64, device=base.device)
    if num_chunks and rows:
        table, aligned = _pointer_table(rows, base.device)
        targets = torch.tensor(list(keys), dtype=torch.int64, device=base.device)
        _chunk_count_kernel[(num_chunks, len(rows))](
            base, table, targets, counts, n, chunk, num_chunks, ALIGNED=aligned,
            BLOCK=min(BLOCK, triton.next_power_of_2(chunk)), **_LAUNCH,
        )
    return counts


def _keeps_table(random_keeps: Sequence[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """Pointer table of the per-input uint8 bit buffers (ceil(n / 8) bytes each, contiguous)."""
    for bits in random_keeps:
        if bits.dtype != torch.uint8 or bits.numel() < (n + 7) // 8 or not bits.is_contiguous():
            raise ValueError(f"random_keeps: need contiguous uint8 buffers of {(n + 7) // 8} bytes, got "
                             f"{bits.dtype} [{bits.numel()}]")
    return _pointer_table(random_keeps, device)[0] if random_keeps else torch.zeros(1, dtype=torch.int64, device=device)


def l1_norm_partials(base: torch.Tensor, inputs: Sequence[torch.Tensor], rules: torch.Tensor,
                     seed: int, offset: int = 0, random_keeps: Sequence[torch.Tensor] = (),
                     replay: bool = False) -> torch.Tensor:
    """float64 [tiles, N, 2]: per-tile sums of |d_i| and of keep_i |d_i| (entry j at flat index
    offset + j). Given `random_keeps` (a bit buffer per input), the random keep decisions are
    recorded there, or with `replay` read from there instead of drawn."""
    n = base.numel()
    partials = torch.zeros(_blocks(n), len(inputs), 2, dtype=torch.float64, device=base.device)
    if n and inputs:
        table, aligned = _pointer_table(inputs, base.device)
        keeps = (_REPLAY if replay else _RECORD) if random_keeps else _DRAW
        _l1_norm_kernel[(_blocks(n),)](
            base, table, rules.to(base.device), _keeps_table(random_keeps, n, base.device), partials, n, len(inputs),
            seed, offset, ALIGNED=aligned, KEEPS=keeps, BLOCK=BLOCK, **_LAUNCH,
        )
    return partials


def fused_gta(base: torch.Tensor, inputs: Sequence[torch.Tensor], rules: torch.Tensor, seed: int,
              coefficients: Sequence[float], weights: Sequence[float], consensus: bool, normalize: bool,
              weight_sum: float, lam: float, out_dtype: torch.dtype, offset: int = 0,
              random_keeps: Sequence[torch.Tensor] = (), out: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused GTA pass: reads base and each input once, writes the merged tensor once (entry j
    at flat index offset + j) into `out` (a new tensor if None); given `random_keeps` it replays
    the random keep decisions recorded there. Also returns int64 [1 + N] NaN/Inf counts (base
    first)."""
    out = _output_for(base, out_dtype, out)
    counts = torch.zeros(1 + len(inputs), dtype=torch.int64, device=base.device)
    n = base.numel()
    if n:
        device = base.device
        table, aligned = _pointer_table(inputs, device)
        _fused_gta_kernel[(_blocks(n),)](
            base, table, rules.to(device), _keeps_table(random_keeps, n, device),
            torch.tensor(list(coefficients), dtype=torch.float32, device=device),
            torch.tensor(list(weights), dtype=torch.float32, device=device), out, counts, n, len(inputs), seed, offset,
            float(weight_sum), float(lam), CONSENSUS=consensus, NORMALIZE=normalize, ALIGNED=aligned,
            KEEPS=_REPLAY if random_keeps else _DRAW, BLOCK=BLOCK, **_LAUNCH,
        )
    return out, counts


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients, out_dtype: torch.dtype,
                 row_length: Optional[int] = None, out: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """sum_k c_k T_k in fp32, cast to out_dtype, into `out` (a new tensor if None); also int64 [K]
    NaN/Inf counts of the T_k. `coefficients`: K numbers, or with `row_length` a float32 device
    tensor [rows, K] of coefficients for each row of row_length entries."""
    first = tensors[0]
    out = _output_for(first, out_dtype, out)
    counts = torch.zeros(len(tensors), dtype=torch.int64, device=first.device)
    n = first.numel()
    if n:
        table, aligned = _pointer_table(tensors, first.device)
        per_row = row_length is not None
        if not per_row:
            coefficients = torch.tensor(list(coefficients), dtype=torch.float32, device=first.device)
        _weighted_sum_kernel[(_blocks(n),)](
            table, coefficients, out, counts, n, len(tensors), row_length if per_row else n,
            DTYPE=_TL_DTYPES[first.dtype], PER_ROW=per_row, ALIGNED=aligned, BLOCK=BLOCK, **_LAUNCH,
        )
    return out, counts


def gram_partials(tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor],
                  row_length: Optional[int] = None) -> torch.Tensor:
    """float64 [rows, tiles, K, K], upper triangle filled: per-tile <T_a - base, T_b - base> within
    each row of row_length entries (default: one row of all entries)."""
    first = tensors[0]
    n, count = first.numel(), len(tensors)
    row_length = row_length or max(n, 1)
    rows = n // row_length
    # Short rows get short tiles (with fewer warps), so that lanes are not wasted past row ends.
    block = min(BLOCK, max(16, triton.next_power_of_2(row_length)))
    tiles = triton.cdiv(row_length, block)
    partials = torch.zeros(rows, tiles, count, count, dtype=torch.float64, device=first.device)
    if n:
        table, aligned = _pointer_table(tensors, first.device)
        _gram_kernel[(rows * tiles,)](
            base if base is not None else first, table, partials, row_length, tiles, count, HAS_BASE=base is not None,
            DTYPE=_TL_DTYPES[first.dtype], ALIGNED=aligned, BLOCK=block,
            **dict(_LAUNCH, num_warps=max(1, min(8, block // 256))),
        )
    return partials


def della_bits(ranks: torch.Tensor, thresholds: torch.Tensor, seed: int, model: int, offset: int) -> torch.Tensor:
    """uint8 [ceil(n / 8)]: DELLA's keep bits for entries of ascending row ranks `ranks` (int64,
    flat, n entries at flat indices offset + j) given per-rank int64 `thresholds`."""
    n = ranks.numel()
    bits = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=ranks.device)
    if n:
        _della_bits_kernel[(_blocks(n),)](ranks, thresholds, bits, n, seed, model, offset, BLOCK=BLOCK, **_LAUNCH)
    return bits
