"""`merge_tensors`: the public tensor-level merge, dispatching to a backend.

Backends:
    "triton"     fused Triton kernels (CUDA tensors; on CPU only under TRITON_INTERPRET=1)
    "cpu"        the C++ extension: chunked, multi-threaded, bounded scratch
    "reference"  plain PyTorch (`merge_reference`), whole tensors; the semantic ground truth
    "auto"       triton for CUDA tensors, cpu for CPU tensors (reference if the extension is
                 missing, with one warning)
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from moefuse.errors import MergeConfigError, MergeInputError
from moefuse.methods import MethodSpec, get_method, resolve_params
from moefuse.ops import backends
from moefuse.ops.merge_reference import (
    gram_reference,
    gta_reference,
    linear_coefficients,
    model_stock_reference,
    model_stock_t,
    slerp_coefficients,
    weighted_sum_reference,
)
from moefuse.ops.plan import KEEP_DELLA, gta_plan

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    if "lambda_" in params:
        params["lambda"] = params.pop("lambda_")
    spec = get_method(method)
    tensors = list(tensors)
    reference_input = _check_inputs(spec, base, tensors)
    resolved = resolve_params(spec, len(tensors), params)
    out_dtype = _check_out_dtype(out_dtype or reference_input.dtype)
    impl = _pick_backend(backend, reference_input.device)
    names = (["base"] if base is not None else []) + [f"tensors[{i}]" for i in range(len(tensors))]
    # The fast backends count NaN/Inf while they read (no extra pass); the reference checks first.
    check = (lambda counts, labels: None) if allow_nonfinite else _raise_if_nonfinite
    if impl is None:
        check([int((~torch.isfinite(t)).sum()) for t in ([base] if base is not None else []) + tensors], names)

    if spec.family == "gta":
        if not tensors:
            return base.to(out_dtype, copy=True)
        plan = gta_plan(spec, resolved, base.numel())
        if impl is not None and any(rule.kind == KEEP_DELLA for rule in plan.rules):
            check(impl.count_nonfinite([base, *tensors]), names)
            impl = None
        if impl is None:
            return gta_reference(base, tensors, plan).to(out_dtype)
        out, counts = impl.gta(base, tensors, plan, out_dtype)
        check(counts, names)
        return out

    if spec.family == "linear":
        if resolved.shared["normalize"] and sum(resolved.per_model["weight"]) == 0:
            raise MergeConfigError(
                "method 'linear': the weights sum to zero, so they cannot be normalized; "
                "change the weights or set normalize: false"
            )
        coefficients = linear_coefficients(resolved.per_model["weight"], resolved.shared["normalize"])
        return _weighted_sum(impl, tensors, coefficients, out_dtype, check, names)

    if spec.family == "slerp":
        pair = [base, tensors[0]]
        gram = _gram(impl, pair, None, check, names)
        coefficients = slerp_coefficients(gram, resolved.shared["t"])
        return _weighted_sum(impl, pair, coefficients, out_dtype, check, names)

    if spec.family == "model_stock":
        if impl is not None and resolved.shared["filter_wise"]:
            check(impl.count_nonfinite([base, *tensors]), names)
            impl = None
        if impl is None:
            return model_stock_reference(base, tensors, resolved.shared["filter_wise"]).to(out_dtype)
        t = model_stock_t(_gram(impl, tensors, base, check, names)).item()
        coefficients = [1 - t] + [t / len(tensors)] * len(tensors)
        return _weighted_sum(impl, [base, *tensors], coefficients, out_dtype, check, names)

    raise AssertionError(f"unhandled method family {spec.family!r}")


def _weighted_sum(impl, tensors: List[torch.Tensor], coefficients: List[float], out_dtype, check, names) -> torch.Tensor:
    if impl is None:
        return weighted_sum_reference(tensors, coefficients).to(out_dtype)
    out, counts = impl.weighted_sum(tensors, coefficients, out_dtype)
    check(counts, names)
    return out


def _gram(impl, tensors: List[torch.Tensor], base, check, names) -> torch.Tensor:
    """Gram matrix; a non-finite one means non-finite inputs, which are then counted and named."""
    if impl is None:
        return gram_reference(tensors, base)
    gram = impl.gram(tensors, base)
    if not torch.isfinite(gram).all():
        everything = ([base] if base is not None else []) + list(tensors)
        check(impl.count_nonfinite(everything), names[-len(everything):])
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


def _check_inputs(spec: MethodSpec, base: Optional[torch.Tensor], tensors: List[torch.Tensor]) -> torch.Tensor:
    """Validate counts, types, shapes, dtypes and devices; return a tensor to take metadata from."""
    where = f"method '{spec.name}'"
    if spec.needs_base and base is None:
        raise MergeInputError(f"{where} needs a base tensor; pass base=...")
    if not spec.needs_base and base is not None:
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
    if first.dtype not in SUPPORTED_DTYPES:
        raise MergeInputError(
            f"{where}: {first_name} has dtype {first.dtype}; supported: float32, bfloat16, float16"
        )
    for name, tensor in named[1:]:
        for what, mine, theirs in (
            ("shape", tuple(tensor.shape), tuple(first.shape)),
            ("dtype", tensor.dtype, first.dtype),
            ("device", tensor.device, first.device),
        ):
            if mine != theirs:
                raise MergeInputError(
                    f"{where}: {name} has {what} {mine} but {first_name} has {theirs}; "
                    f"all inputs must share shape, dtype and device"
                )
    return first


def _check_out_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        raise MergeConfigError(f"out_dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return dtype


def _raise_if_nonfinite(counts: Sequence[int], names: Sequence[str]) -> None:
    for name, count in zip(names, counts):
        if count:
            raise MergeInputError(
                f"{name} holds {count} NaN/Inf value(s); fix the checkpoint or pass allow_nonfinite=True"
            )
