"""`merge_tensors`: the public tensor-level merge, dispatching to a backend.

Backends:
    "triton"     fused Triton kernels (CUDA tensors; on CPU only under TRITON_INTERPRET=1)
    "cpu"        the C++ extension: chunked, multi-threaded, bounded scratch
    "reference"  plain PyTorch (`merge_reference`), whole tensors; the semantic ground truth
    "auto"       triton for CUDA tensors, cpu for CPU tensors (reference if the extension is
                 missing, with one warning)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from moefuse.errors import MergeConfigError, MergeInputError, NonfiniteInputError
from moefuse.methods import MethodSpec, get_method, resolve_params
from moefuse.ops import backends
from moefuse.ops.gta_pipeline import Allocate, output_buffer, run_gta
from moefuse.ops.merge_reference import (
    gram_reference,
    gta_reference,
    linear_coefficients,
    model_stock_reference,
    model_stock_t,
    nearswap_values,
    nuslerp_vectors_reference,
    sce_reference,
    slerp_coefficients,
    weighted_sum_reference,
)
from moefuse.ops.pieces import TORCH_CHUNK, Pieces, add_counts, torch_chunk
from moefuse.ops.plan import KEEP_DELLA, gta_plan
from moefuse.ops.rowwise import merge_row_blocks
from moefuse.ops.sce import sce_streamed
from moefuse.ops.spherical import nuslerp_t, nuslerp_vectorwise, point_coefficients, task_arithmetic_plan

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in SUPPORTED_DTYPES}
Emit = Callable[[torch.Tensor], None]


def merge_tensors(
    base: Optional[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    method: str = "ties",
    *,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
    **params: Any,
) -> torch.Tensor:
    """Merge `tensors` (the fine-tuned models' versions of one tensor) onto `base`.

    Args:
        base: the base model's tensor (required except for "linear", where it must be None).
        tensors: one tensor per model, same shape, dtype and device as `base`.
        method: a name from `moefuse.method_names()`; the math is in `moefuse.methods`.
        out_dtype: result dtype (default: the inputs' dtype). Arithmetic is always fp32.
        backend: "auto", "triton", "cpu" or "reference" (see module docstring).
        allow_nonfinite: propagate NaN/Inf instead of raising.
        **params: the method's parameters with mergekit's names: per-model `weight`, `density`,
            `gamma`, `epsilon` (one value, or a sequence with one value per model) and global
            `lambda`, `normalize`, `rescale`, `rescale_mode`, `seed`, `t`, `filter_wise`.
            `lambda_` is accepted for `lambda`.

    Returns:
        The merged tensor, shape of the inputs, dtype `out_dtype` or the inputs' dtype.
    """
    pieces: List[torch.Tensor] = []
    shape = _merge(base, list(tensors), method, pieces.append, None, out_dtype, backend, allow_nonfinite, params)
    return pieces[0].reshape(shape)  # an in-memory merge emits a single piece


def merge_streamed(
    base: Optional[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    method: str,
    emit: Emit,
    *,
    piece_size: int,
    release: Optional[Callable[[int, int], None]] = None,
    compute_dtype: Optional[torch.dtype] = None,
    allocate: Optional[Allocate] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
    **params: Any,
) -> None:
    """`merge_tensors` for tensors too large to hold twice: the flattened output is handed to
    `emit` as consecutive pieces of `piece_size` entries (rounded up to a power of two, at least
    65536; the last piece may be shorter), in order.

    Every pass over the inputs reads them one flat range at a time, cast to `compute_dtype`
    (default: their own dtype, which they must then share; with a compute dtype they may be
    stored in differing ones), and then calls `release(start, stop)` for that range, so that
    a caller reading memory-mapped files can drop the pages: with the CPU extension, resident
    memory is a few pieces whatever the tensor size. The numbers equal `merge_tensors`' on the
    cast inputs. DELLA and filter-wise Model Stock are emitted in blocks of whole rows
    (`moefuse.ops.rowwise`); SCE and NearSwap in chunks of at most 65536 entries on a CPU
    (`moefuse.ops.pieces.torch_chunk`), and nuslerp per vector in chunks of whole rows of at most
    that (or one row, if longer); the reference backend merges the whole tensor in memory (and
    emits it as one piece).

    With `allocate(entries, dtype)`, the fast backends write each output piece of the other
    methods into the contiguous buffer it returns (a caller can so reuse the buffers of pieces it
    has consumed: a fresh buffer costs a page fault per 4 KiB).
    """
    _merge(base, list(tensors), method, emit, (piece_size, release, compute_dtype, allocate), out_dtype, backend,
           allow_nonfinite, params)


def _merge(base, tensors: List[torch.Tensor], method: str, emit: Emit, streaming, out_dtype, backend: str,
           allow_nonfinite: bool, params) -> torch.Size:
    """Shared body of merge_tensors (streaming None) and merge_streamed; returns the shape."""
    if "lambda_" in params:
        if "lambda" in params:
            raise MergeConfigError("give 'lambda_' or 'lambda' (the same parameter), not both")
        params["lambda"] = params.pop("lambda_")
    spec = get_method(method)
    compute_dtype = _supported_dtype(streaming[2], "compute_dtype") if streaming is not None else None
    reference_input = _check_inputs(spec, base, tensors, cast=compute_dtype is not None)
    resolved = resolve_params(spec, len(tensors), params)
    n = reference_input.numel()
    allocate = None
    if streaming is None:
        pieces = Pieces.whole(n)
    else:
        piece_size, release, _, allocate = streaming
        stored = {t.dtype for t in ([base] if base is not None else []) + tensors}
        cast = compute_dtype if compute_dtype is not None and stored != {compute_dtype} else None
        pieces = Pieces.streaming(n, piece_size, release, cast)
    out_dtype = _supported_dtype(out_dtype, "out_dtype") or pieces.cast or reference_input.dtype
    impl = _pick_backend(backend, reference_input.device)
    names = (["base"] if base is not None else []) + [f"tensors[{i}]" for i in range(len(tensors))]
    # The fast backends count NaN/Inf while they read (no extra pass); the reference checks first.
    check = (lambda counts, labels: None) if allow_nonfinite else _raise_if_nonfinite
    flat_base = base.contiguous().reshape(-1) if base is not None else None
    flat = [t.contiguous().reshape(-1) for t in tensors]

    plan = gta_plan(spec, resolved, n) if spec.family == "gta" and tensors else None
    row_local = _row_local(spec, resolved, plan)
    # Row-local merges walk blocks of rows, in memory too with a fast backend: the CPU one runs them in
    # its kernels; on a GPU the reference's temporaries then stay those of one block.
    if row_local and (streaming is not None or impl is not None):
        out = None if streaming is not None else _Collected(n, out_dtype, reference_input.device)
        counts = merge_row_blocks(impl, spec, plan, flat_base, flat, tuple(reference_input.shape), pieces, out_dtype,
                                  emit if out is None else out.append, allocate)
        check(counts, names)
        if out is not None:
            emit(out.result())
        return reference_input.shape
    if impl is None:
        whole = pieces.read(([flat_base] if base is not None else []) + flat, 0, n)
        whole = [t.reshape(reference_input.shape) for t in whole]
        check([int((~torch.isfinite(t)).sum()) for t in whole], names)
        emit(_reference(spec, resolved, plan, whole[0] if base is not None else None,
                        whole[1:] if base is not None else whole).to(out_dtype).reshape(-1))
        return reference_input.shape

    if spec.family == "gta":
        if not tensors:
            for _, _, (piece,) in pieces.walk([flat_base]):
                emit(piece.to(out_dtype, copy=True))
        else:
            check(run_gta(impl, flat_base, flat, plan, out_dtype, pieces, emit, allocate), names)
    elif spec.family == "linear":
        _check_linear_weights(resolved)
        coefficients = linear_coefficients(resolved.per_model["weight"], resolved.shared["normalize"])
        _weighted_sum(impl, flat, coefficients, out_dtype, check, names, pieces, emit, allocate)
    elif spec.family == "passthrough":
        _weighted_sum(impl, flat, resolved.per_model["scale"], out_dtype, check, names, pieces, emit, allocate)
    elif spec.family == "slerp":
        pair = [flat_base, flat[0]]
        coefficients = slerp_coefficients(_gram(impl, pair, None, check, names, pieces), resolved.shared["t"])
        _weighted_sum(impl, pair, coefficients, out_dtype, check, names, pieces, emit, allocate)
    elif spec.family == "model_stock":
        t = model_stock_t(_gram(impl, flat, flat_base, check, names, pieces)).item()
        coefficients = [1 - t] + [t / len(tensors)] * len(tensors)
        _weighted_sum(impl, [flat_base, *flat], coefficients, out_dtype, check, names, pieces, emit, allocate)
    elif spec.family == "sphere" and not _per_vector(spec, resolved, reference_input.dim()):
        coefficients = point_coefficients(spec.name, resolved, _gram(impl, flat, flat_base, check, names, pieces))
        if base is None:
            _weighted_sum(impl, flat, coefficients, out_dtype, check, names, pieces, emit, allocate)
        else:
            check(run_gta(impl, flat_base, flat, task_arithmetic_plan(coefficients), out_dtype, pieces, emit, allocate),
                  names)
    elif spec.runs_torch_operations(resolved.shared):  # on cache-sized chunks
        out = None if streaming is not None else _Collected(n, out_dtype, reference_input.device)
        counts, outputs = _torch_merge(impl, spec, resolved, flat_base, flat, tuple(reference_input.shape), pieces)
        _emit_computed(counts, outputs, out_dtype, check, names, allocate, emit if out is None else out.append)
        if out is not None:
            emit(out.result())
    else:
        raise AssertionError(f"unhandled method family {spec.family!r}")
    return reference_input.shape


def merges_row_blocks(method: str, num_models: int, params: Dict[str, Any], numel: int) -> bool:
    """Whether `merge_streamed` runs this merge on blocks of whole rows (`moefuse.ops.rowwise`)
    rather than in flat pieces with the fused kernels (`params` as given to the merge)."""
    spec = get_method(method)
    resolved = resolve_params(spec, num_models, dict(params))
    plan = gta_plan(spec, resolved, numel) if spec.family == "gta" and num_models else None
    return _row_local(spec, resolved, plan)


def torch_scratch_bytes(method: str, num_models: int, params: Dict[str, Any], shape: Tuple[int, ...]) -> int:
    """Bytes of temporaries of the merges run with torch operations on the CPU, in chunks of about
    TORCH_CHUNK entries (SCE: the task vectors, their fp64 copies and squares, about 24 bytes per entry and
    model, and the variance's fp64 sums; NearSwap: a few fp32 copies; nuslerp per vector: fp64
    products of chunks of whole rows); 0 for the fused kernels, whose fp32 scratch is per tile."""
    spec = get_method(method)
    if spec.family == "sce":
        return (24 * num_models + 64) * TORCH_CHUNK
    if spec.family == "nearswap":
        return 48 * TORCH_CHUNK
    resolved = resolve_params(spec, num_models, dict(params))
    if _per_vector(spec, resolved, len(shape)):
        numel = math.prod(shape)
        width = numel // max(shape[0], 1) if resolved.shared["nuslerp_row_wise"] else shape[-1]
        vectors = numel // max(width, 1) if not resolved.shared["nuslerp_row_wise"] else width
        return 96 * max(TORCH_CHUNK, width) + 256 * vectors  # chunk temporaries, fp64 Gram state per vector
    return 0


def _row_local(spec: MethodSpec, resolved, plan) -> bool:
    """Methods that merge within rows (`moefuse.ops.rowwise`), not in flat pieces: DELLA's
    row-wise ranks and filter-wise Model Stock."""
    if plan is not None:
        return any(rule.kind == KEEP_DELLA for rule in plan.rules)
    return spec.family == "model_stock" and bool(resolved.shared["filter_wise"])


class _Collected:
    """The flat output of an in-memory merge, filled block by block in order (a single block that
    is the whole output is kept as it is, not copied)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.n, self.dtype, self.device = n, dtype, device
        self.tensor: Optional[torch.Tensor] = None
        self.filled = 0

    def append(self, block: torch.Tensor) -> None:
        if self.tensor is None and block.numel() == self.n:
            self.tensor = block.reshape(-1)
        else:
            if self.tensor is None:
                self.tensor = torch.empty(self.n, dtype=self.dtype, device=self.device)
            self.tensor[self.filled:self.filled + block.numel()] = block.reshape(-1)
        self.filled += block.numel()

    def result(self) -> torch.Tensor:
        return self.tensor if self.tensor is not None else torch.empty(self.n, dtype=self.dtype, device=self.device)


def _reference(spec: MethodSpec, resolved, plan, base, tensors: List[torch.Tensor]) -> torch.Tensor:
    """The whole merge with the plain-PyTorch reference."""
    if spec.family == "gta":
        return base.clone() if not tensors else gta_reference(base, tensors, plan)
    if spec.family == "linear":
        _check_linear_weights(resolved)
        coefficients = linear_coefficients(resolved.per_model["weight"], resolved.shared["normalize"])
        return weighted_sum_reference(tensors, coefficients)
    if spec.family == "passthrough":
        return weighted_sum_reference(tensors, resolved.per_model["scale"])
    if spec.family == "slerp":
        pair = [base, tensors[0]]
        return weighted_sum_reference(pair, slerp_coefficients(gram_reference(pair), resolved.shared["t"]))
    if spec.family == "model_stock":
        return model_stock_reference(base, tensors, resolved.shared["filter_wise"])
    if _per_vector(spec, resolved, tensors[0].dim()):
        return nuslerp_vectors_reference(base, tensors, nuslerp_t(resolved.per_model["weight"]),
                                         resolved.shared["nuslerp_row_wise"])
    if spec.family == "sphere":
        coefficients = point_coefficients(spec.name, resolved, gram_reference(tensors, base))
        if base is None:
            return weighted_sum_reference(tensors, coefficients)
        return gta_reference(base, tensors, task_arithmetic_plan(coefficients))
    if spec.family == "nearswap":
        return nearswap_values(base, tensors[0], resolved.shared["t"])
    if spec.family == "sce":
        return sce_reference(base, tensors, resolved.shared["select_topk"])
    raise AssertionError(f"unhandled method family {spec.family!r}")


def _per_vector(spec: MethodSpec, resolved, ndim: int) -> bool:
    """nuslerp without flattening, on a tensor of two or more dimensions: one angle per vector
    (`moefuse.ops.spherical.nuslerp_vectorwise`); a smaller tensor is a single vector."""
    return spec.family == "sphere" and spec.runs_torch_operations(resolved.shared) and ndim >= 2


def _torch_merge(impl, spec: MethodSpec, resolved, base: Optional[torch.Tensor], tensors: List[torch.Tensor],
                 shape: Tuple[int, ...], pieces: Pieces) -> Tuple[List[int], Iterator[torch.Tensor]]:
    """The merges run as torch operations (nuslerp per vector, NearSwap, SCE): the inputs' NaN/Inf
    counts (complete once the outputs are) and an iterator over fp32 output chunks of about
    `torch_chunk` entries."""
    if spec.family == "sphere":
        return nuslerp_vectorwise(base, tensors, shape, nuslerp_t(resolved.per_model["weight"]),
                                  resolved.shared["nuslerp_row_wise"], pieces, impl.count_nonfinite)
    chunks = pieces.resized(min(pieces.size, torch_chunk(tensors[0].device)))
    if spec.family == "sce":
        return sce_streamed(base, tensors, resolved.shared["select_topk"], chunks, impl.count_nonfinite)
    counts = [0, 0]
    return counts, _nearswap_chunks(impl, base, tensors[0], resolved.shared["t"], chunks, counts)


def _emit_computed(counts: List[int], outputs: Iterator[torch.Tensor], out_dtype: torch.dtype, check, names,
                   allocate: Optional[Allocate], emit: Emit) -> None:
    """Emit fp32 output pieces computed with torch operations, cast to `out_dtype` (into allocated
    buffers where given), then check the inputs' NaN/Inf `counts` (complete once `outputs` is)."""
    for piece in outputs:
        buffer = output_buffer(allocate, piece.numel(), out_dtype)
        emit(buffer.copy_(piece) if buffer is not None else piece.to(out_dtype))
    check(counts, names[-len(counts):])


def _nearswap_chunks(impl, base: torch.Tensor, model: torch.Tensor, t: float, chunks: Pieces,
                     counts: List[int]) -> Iterator[torch.Tensor]:
    """NearSwap chunk by chunk, adding the NaN/Inf counts of base and model to `counts`."""
    for _, _, chunk in chunks.walk([base, model]):
        counts[:] = add_counts(counts, impl.count_nonfinite(chunk))
        yield nearswap_values(chunk[0], chunk[1], t)


def _check_linear_weights(resolved) -> None:
    if resolved.shared["normalize"] and sum(resolved.per_model["weight"]) == 0:
        raise MergeConfigError(
            "method 'linear': the weights sum to zero, so they cannot be normalized; "
            "change the weights or set normalize: false"
        )


def _weighted_sum(impl, tensors: List[torch.Tensor], coefficients: List[float], out_dtype, check, names,
                  pieces: Pieces, emit: Emit, allocate: Optional[Allocate]) -> None:
    counts = [0] * len(tensors)
    for start, stop, piece in pieces.walk(tensors):
        out, piece_counts = impl.weighted_sum(piece, coefficients, out_dtype,
                                              out=output_buffer(allocate, stop - start, out_dtype))
        emit(out)
        counts = add_counts(counts, piece_counts)
    check(counts, names[-len(tensors):])


def _gram(impl, tensors: List[torch.Tensor], base, check, names, pieces: Pieces) -> torch.Tensor:
    """Gram matrix (summed over pieces). A non-finite one means non-finite inputs, which are then
    counted and named, or finite ones whose products overflow the kernels' fp32 tile sums (entries
    near 1e19 and beyond): then it is summed again in fp64."""
    everything = ([base] if base is not None else []) + list(tensors)

    def summed(gram_of) -> torch.Tensor:
        gram = torch.zeros(len(tensors), len(tensors), dtype=torch.float64)
        for _, _, piece in pieces.walk(everything):
            gram += gram_of(piece[-len(tensors):], piece[0] if base is not None else None).cpu()
        return gram

    gram = summed(impl.gram)
    if not torch.isfinite(gram).all():
        counts = [0] * len(everything)
        for _, _, piece in pieces.walk(everything):
            counts = add_counts(counts, impl.count_nonfinite(piece))
        check(counts, names[-len(everything):])
        if not any(counts):
            gram = summed(gram_reference)
    return gram


def _pick_backend(name: str, device: torch.device):
    """The backend module for `name`, or None for the reference."""
    if name == "reference":
        return None
    if name == "auto":
        if device.type == "cuda":
            return backends.triton_backend()
        return backends.cpu_backend(warn_if_missing=True)
    if name == "triton":
        return backends.triton_backend()
    if name == "cpu":
        if device.type != "cpu":
            raise MergeConfigError(f"backend 'cpu' needs CPU tensors, got {device}; use 'auto' or 'triton'")
        impl = backends.cpu_backend(warn_if_missing=False)
        if impl is None:
            raise MergeConfigError(
                f"backend 'cpu' needs the C++ extension, which is not available: "
                f"{backends.cpu_unavailable_reason()}; reinstall moefuse or use backend='reference'"
            )
        return impl
    raise MergeConfigError(f"unknown backend {name!r}; valid: auto, triton, cpu, reference")


def _check_inputs(spec: MethodSpec, base: Optional[torch.Tensor], tensors: List[torch.Tensor],
                  cast: bool = False) -> torch.Tensor:
    """Validate counts, types, shapes, dtypes and devices; return a tensor to take metadata from.
    With `cast` (the inputs are cast to a compute dtype as they are read) their dtypes may differ,
    each being a supported one."""
    where = f"method '{spec.name}'"
    if spec.needs_base and base is None:
        raise MergeInputError(f"{where} needs a base tensor; pass base=...")
    if not spec.uses_base and base is not None:
        raise MergeInputError(
            f"{where} uses no base; pass base=None and list every model in tensors (with its weight)"
        )
    if len(tensors) < spec.min_models:
        raise MergeInputError(f"{where} needs at least {spec.min_models} model tensor(s), got {len(tensors)}")
    if spec.max_models is not None and len(tensors) > spec.max_models:
        raise MergeInputError(f"{where} takes at most {spec.max_models} model tensor(s), got {len(tensors)}")
    named = ([("base", base)] if base is not None else []) + [
        (f"tensors[{i}]", t) for i, t in enumerate(tensors)
    ]
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise MergeInputError(f"{where}: {name} is a {type(tensor).__name__}, not a torch.Tensor")
    first_name, first = named[0]
    for name, tensor in named if cast else named[:1]:  # without a cast, the others must share its dtype
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise MergeInputError(
                f"{where}: {name} has dtype {tensor.dtype}; supported: float32, bfloat16, float16"
            )
    for name, tensor in named[1:]:
        for what, mine, theirs in (
            ("shape", tuple(tensor.shape), tuple(first.shape)),
            ("dtype", tensor.dtype, first.dtype),
            ("device", tensor.device, first.device),
        ):
            if mine != theirs and not (cast and what == "dtype"):
                raise MergeInputError(
                    f"{where}: {name} has {what} {mine} but {first_name} has {theirs}; "
                    f"all inputs must share shape, dtype and device"
                )
    return first


def _supported_dtype(dtype: Union[torch.dtype, str, None], option: str) -> Optional[torch.dtype]:
    """`dtype` (a torch dtype, its name such as "bfloat16", or None) checked to be supported."""
    named = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if named is not None and named not in SUPPORTED_DTYPES:
        raise MergeConfigError(f"{option} {dtype!r} is not supported; use float32, bfloat16 or float16 "
                               "(a torch dtype or its name)")
    return named


def _raise_if_nonfinite(counts: Sequence[int], names: Sequence[str]) -> None:
    """Names are "base" or "tensors[i]" (see _merge)."""
    for name, count in zip(names, counts):
        if count:
            raise NonfiniteInputError(
                f"{name} holds {count} NaN/Inf value(s); fix the checkpoint or pass allow_nonfinite=True",
                None if name == "base" else int(name[len("tensors["):-1]), count,
            )
