"""moefuse as the tensor backend of mergekit 0.1.5.

Usage
-----
Command line: ``moefuse-mergekit CONFIG.yml OUT_DIR [options]`` takes exactly the arguments and
options of ``mergekit-yaml`` and runs it with moefuse doing the tensor arithmetic.

Python, around any mergekit entry point (``mergekit.merge.run_merge``,
``mergekit.merge_methods.merge_tensors`` / ``merge_state_dicts``, or a method object)::

    from moefuse.integrations import mergekit as moefuse_mergekit

    with moefuse_mergekit.enabled():          # or enable(backend) ... disable()
        run_merge(merge_config, out_path, options=merge_options)

What is covered
---------------
The mergekit methods moefuse implements: task_arithmetic, ties, dare_ties, dare_linear,
breadcrumbs, breadcrumbs_ties, della, della_linear, linear, slerp, model_stock, nuslerp,
multislerp, karcher, nearswap and sce, each only if
mergekit's definition (parameters, defaults, sparsifier, sign election) matches moefuse's.
`enable()` replaces only the numerical kernel of those method objects in mergekit's registry
(the objects every mergekit code path looks up); mergekit still reads the configuration,
validates and binds parameters, plans, loads, converts dtypes, batches and writes. Other
methods keep running mergekit's code. With the default backend "auto", CUDA tensors (mergekit's
``--cuda``) go to moefuse's Triton kernels and CPU tensors to its C++ extension. A single call also runs mergekit's code where moefuse declines it: float64 or
integer tensors, NaN/Inf in the inputs, parameter values outside moefuse's ranges (mergekit then
computes or raises as usual), inputs that need autograd, or arguments mergekit's own kernel
would reject. `int8_mask` changes nothing (moefuse never materializes masks).

Differences from mergekit
-------------------------
moefuse computes in fp32 and returns the input dtype. For fp32 inputs the results match
mergekit's to 1e-6 relative. For bf16/fp16 inputs mergekit's task-arithmetic family, model_stock,
nuslerp, multislerp, karcher, nearswap and sce round each intermediate step to the input dtype,
so results can differ in the last bits, and sce's coarser 16-bit variances select other entries
near its cut (linear and slerp compute in fp32 in both); and where 16-bit task vectors hold equal
magnitudes at a trim threshold, mergekit keeps an arbitrary one and moefuse the lower index (the
same for equal variances at sce's selection cut). multislerp of points that are all zero (every
model equal to the base) returns the base where mergekit raises; nuslerp interpolates linearly
where the cosine is within 4 fp32 ulps of +-1, mergekit only where its fp32 cosine is exactly +-1
(see `moefuse.methods.spherical`).

DARE and DELLA (dare_ties, dare_linear, della, della_linear) drop entries at random. mergekit
draws its masks with torch.bernoulli; moefuse draws them from its counter-based Philox
generator, so the masks, and thus the merged weights, differ from mergekit's, with the same keep
probabilities and the same L1 rescaling. Every call takes a fresh seed from torch's global
generator: different tensors get independent masks, and ``--random-seed`` (or
``torch.manual_seed``) still makes a run reproducible, with moefuse's masks.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from moefuse.errors import MergeConfigError, MoefuseError
from moefuse.methods import MethodSpec, get_method, method_names
from moefuse.methods.base import BASE_AS_INPUT, MODEL_SCOPE
from moefuse.ops.merge import merge_tensors

BACKENDS = ("auto", "triton", "cpu", "reference")

# mergekit's sparsification method names -> moefuse's `MethodSpec.sparsifier`
_SPARSIFIERS = {
    "magnitude": "magnitude",
    "random": "random",
    "magnitude_outliers": "breadcrumbs",
    "della_magprune": "della",
}
_SEED_LIMIT = 2**63 - 1
_ABSENT = object()

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_backend: Optional[str] = None
_patches: List["_Patch"] = []


@dataclass(frozen=True)
class _Patch:
    """One replaced attribute of a mergekit method object and what it held before."""

    target: Any
    name: str
    saved: Any  # the object's own value, or _ABSENT when the attribute came from its class

    def undo(self) -> None:
        # object.__*attr__ because mergekit's task-arithmetic methods are frozen dataclasses
        if self.saved is _ABSENT:
            object.__delattr__(self.target, self.name)
        else:
            object.__setattr__(self.target, self.name, self.saved)


def enable(backend: str = "auto") -> None:
    """Make mergekit run the methods moefuse covers through `moefuse.merge_tensors`.

    `backend` is passed to `merge_tensors` ("auto": Triton for CUDA tensors, the C++ extension
    for CPU tensors). Calling `enable` again only changes the backend. Raises ImportError when
    mergekit is not installed and MergeConfigError for an unknown backend.
    """
    global _backend
    if backend not in BACKENDS:
        raise MergeConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    with _lock:
        if _backend is None:
            try:
                _install()
            except BaseException:
                _restore()
                raise
        _backend = backend


def disable() -> None:
    """Give mergekit back its own kernels: every replaced attribute is restored to the very object
    it held before `enable` (or removed again where it came from the class). No-op when disabled."""
    global _backend
    with _lock:
        _restore()
        _backend = None


def is_enabled() -> bool:
    """Whether `enable` is in effect."""
    return _backend is not None


def covered_methods() -> Tuple[str, ...]:
    """Names of the mergekit methods currently routed through moefuse (empty when disabled)."""
    return tuple(sorted({patch.target.spec.name for patch in _patches}))


@contextmanager
def enabled(backend: str = "auto") -> Iterator[None]:
    """`enable(backend)` for the duration of a with-block, then the previous state again."""
    previous = _backend
    enable(backend)
    try:
        yield
    finally:
        if previous is None:
            disable()
        else:
            enable(previous)


def main() -> None:
    """Console script `moefuse-mergekit`: mergekit's `mergekit-yaml` command (same arguments,
    options and exit status) with moefuse enabled."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    enable()
    mergekit_yaml(prog_name="moefuse-mergekit")


def _restore() -> None:
    while _patches:
        _patches.pop().undo()


def _install() -> None:
    try:
        from mergekit.merge_methods import registry
    except ImportError as error:
        raise ImportError(
            "moefuse's mergekit backend needs mergekit 0.1.5: pip install 'moefuse[mergekit]'"
        ) from error
    for method in registry.registered_methods():
        hook = _hook_for(method)
        if hook is None:
            continue
        name, run = hook
        # merge_group reads each parameter by key (mergekit's binding supplies all of them);
        # the implementation functions have defaults in their signatures, filled in the same way
        kernel = _kernel(getattr(method, name), run, method.spec, fill_defaults=name == "implementation")
        saved = vars(method).get(name, _ABSENT)
        object.__setattr__(method, name, kernel)
        _patches.append(_Patch(method, name, saved))


def _hook_for(method: Any) -> Optional[Tuple[str, Callable]]:
    """(attribute holding the kernel, moefuse's stand-in computation) for a mergekit method object
    that moefuse implements with the same parameters and rules; None for any other."""
    from mergekit.merge_methods.base import BatchedMergeMethod, FunctionalGroupMergeMethod
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    if method.spec.name not in method_names():
        return None
    spec = get_method(method.spec.name)
    if not _same_parameters(method.spec, spec):
        return None
    if spec.family == "gta":
        matches = isinstance(method, GeneralizedTaskArithmeticMerge) and _same_gta_rules(method, spec)
        return ("merge_group", functools.partial(_merge_group, spec)) if matches else None
    kind, run = {
        "model_stock": (FunctionalGroupMergeMethod, _merge_group),
        "sphere": (FunctionalGroupMergeMethod, _merge_group),
        "nearswap": (FunctionalGroupMergeMethod, _merge_group),
        "sce": (FunctionalGroupMergeMethod, _merge_group),
        "linear": (BatchedMergeMethod, _merge_linear),
        "slerp": (BatchedMergeMethod, _merge_slerp),
    }.get(spec.family, (None, None))  # passthrough (a copy) is left to mergekit
    return ("implementation", functools.partial(run, spec)) if kind and isinstance(method, kind) else None


def _same_parameters(theirs: Any, ours: MethodSpec) -> bool:
    """Whether each mergekit parameter exists in moefuse's spec with the same scope (per model
    or shared) and, where mergekit has a default, the same default."""
    from mergekit.merge_methods.base import ParameterScope

    for parameter in theirs.parameters:
        if parameter.name not in ours.param_names:
            return False
        mine = ours.param(parameter.name)
        if (parameter.scope != ParameterScope.SHARED) != (mine.scope == MODEL_SCOPE):
            return False
        if not parameter.required and parameter.default != mine.default:
            return False
    return True


def _same_gta_rules(method: Any, spec: MethodSpec) -> bool:
    from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod

    sparsifier = method.sparsification_method
    consensus = {None: False, ConsensusMethod.sum: True}.get(method.consensus_method)
    return (
        (None if sparsifier is None else _SPARSIFIERS.get(sparsifier.value)) == spec.sparsifier
        and consensus == spec.consensus
    )


def _kernel(original: Callable, run: Callable, theirs: Any, fill_defaults: bool) -> Callable:
    """A stand-in for mergekit's kernel `original`: `run(inputs, parameters)` where that gives a
    tensor, `original` where it gives None or the parameter names are not exactly mergekit's."""
    names = {parameter.name for parameter in theirs.parameters}
    defaults = (
        {p.name: p.default for p in theirs.parameters if not p.required} if fill_defaults else {}
    )

    @functools.wraps(original)
    def kernel(inputs, /, **parameters):
        call = {**defaults, **parameters}
        result = run(inputs, call) if set(call) == names else None
        return original(inputs, **parameters) if result is None else result

    return kernel


def _merge_group(spec: MethodSpec, group: Any, parameters: Dict[str, Any]) -> Optional[torch.Tensor]:
    """A TensorGroup kernel (task-arithmetic family, model_stock, nuslerp, multislerp, karcher,
    nearswap, sce); per-model parameters are mappings keyed by entry id. The base goes where
    `spec.base` puts it: karcher's is one more input."""
    if spec.base == BASE_AS_INPUT:
        base, entries = None, list(group.entries)
    elif group.base is None and spec.needs_base:
        return None
    else:
        base, entries = (group.base.tensor if group.base is not None else None), group.non_base
    if not entries and spec.family == "gta":
        return base
    params = {}
    for name, value in parameters.items():
        if spec.param(name).scope != MODEL_SCOPE:
            params[name] = _scalar(value)
        elif isinstance(value, Mapping) and all(entry.id in value for entry in entries):
            params[name] = [_scalar(value[entry.id]) for entry in entries]
        else:
            return None
    return _merge(spec, base, [entry.tensor for entry in entries], params)


def _merge_linear(spec: MethodSpec, batch: Any, parameters: Dict[str, Any]) -> Optional[torch.Tensor]:
    """mergekit's linear kernel: inputs [outputs, ...], `weight` a tensor [outputs, inputs].
    One moefuse call for the whole batch when every output has the same weights."""
    weight, outputs = parameters["weight"], batch.tensors[0].shape[0]
    if not isinstance(weight, torch.Tensor) or weight.shape != (outputs, len(batch.tensors)):
        return None
    rows = weight.to(torch.float32)  # the precision mergekit's kernel applies them in
    normalize = parameters["normalize"]
    if bool((rows == rows[0]).all()):
        params = {"weight": rows[0].tolist(), "normalize": normalize}
        return _merge(spec, None, batch.tensors, params, weight)
    return _per_output(
        outputs,
        lambda index: _merge(
            spec,
            None,
            [tensor[index] for tensor in batch.tensors],
            {"weight": rows[index].tolist(), "normalize": normalize},
            weight,
        ),
    )


def _merge_slerp(spec: MethodSpec, batch: Any, parameters: Dict[str, Any]) -> Optional[torch.Tensor]:
    """mergekit's slerp kernel: base and other model [outputs, ...], `t` one value or one per
    output. Each output is its own slerp (the angle is per output), so one call per output."""
    t = parameters["t"]
    if batch.base_index is None or len(batch.tensors) != 2 or not isinstance(t, torch.Tensor):
        return None
    base, other = batch.tensors[batch.base_index], batch.tensors[1 - batch.base_index]
    outputs = base.shape[0]
    values = t.to(torch.float32).reshape(-1).tolist()
    if len(values) == 1:
        values *= outputs
    if len(values) != outputs:
        return None
    return _per_output(
        outputs, lambda index: _merge(spec, base[index], [other[index]], {"t": values[index]}, t)
    )


def _per_output(count: int, merge_one: Callable[[int], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """merge_one(0), ..., merge_one(count - 1) stacked on a new leading axis; None as soon as one
    is declined."""
    slices = []
    for index in range(count):
        merged = merge_one(index)
        if merged is None:
            return None
        slices.append(merged)
    return slices[0].unsqueeze(0) if count == 1 else torch.stack(slices)


def _merge(
    spec: MethodSpec,
    base: Optional[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    params: Dict[str, Any],
    *parameter_tensors: torch.Tensor,
) -> Optional[torch.Tensor]:
    """`moefuse.merge_tensors`, or None where moefuse declines the call (mergekit's code runs)."""
    inputs = [*([] if base is None else [base]), *tensors, *parameter_tensors]
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs):
        return None
    if "seed" in spec.param_names:
        params = {**params, "seed": int(torch.randint(_SEED_LIMIT, (), dtype=torch.int64))}
    try:
        # `or "auto"`: a call still in flight while disable() runs
        return merge_tensors(base, tensors, spec.name, backend=_backend or "auto", **params)
    except MoefuseError as error:
        logger.debug("moefuse declined a %s merge, running mergekit's code: %s", spec.name, error)
        return None


def _scalar(value: Any) -> Any:
    """A one-element tensor as a Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value
