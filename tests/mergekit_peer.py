"""Run mergekit 0.1.5's own method code on tensors, for parity tests and benchmarks.

`mergekit_merge(method, base, tensors, **params)` mirrors `moefuse.merge_tensors`. For the
random sparsifiers, `masks` injects the keep masks (mergekit draws them with torch.bernoulli),
so that the rest of the computation can be compared exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence
from unittest import mock

import torch

from tests.helpers import require_peer

GTA_DEFAULT_KEYS = ("normalize", "rescale", "lambda", "int8_mask")
GROUP_METHODS = ("nuslerp", "multislerp", "karcher", "nearswap", "sce")  # mergekit's TensorGroup methods


@contextmanager
def _injected_bernoulli(masks: Optional[List[torch.Tensor]]):
    if masks is None:
        yield
        return
    queue = list(masks)

    def fake_bernoulli(probabilities, *args, **kwargs):
        return queue.pop(0).to(probabilities.dtype).reshape(probabilities.shape)

    with mock.patch.object(torch, "bernoulli", fake_bernoulli):
        yield
    assert not queue, "mergekit drew fewer masks than injected"


def mergekit_merge(
    method: str,
    base: Optional[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    masks: Optional[List[torch.Tensor]] = None,
    **params: Any,
) -> torch.Tensor:
    require_peer("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorBatch, TensorGroup

    impl = registry.get(method)
    n = len(tensors)
    if method == "linear":
        weights = _per_model(params.get("weight", 1.0), n)
        batch = TensorBatch(tensors=tuple(t.unsqueeze(0) for t in tensors))
        out = impl.merge_batch(
            batch,
            weight=torch.tensor([weights], dtype=torch.float64),
            normalize=params.get("normalize", True),
        )
        return out[0]
    if method == "slerp":
        batch = TensorBatch(tensors=(base.unsqueeze(0), tensors[0].unsqueeze(0)), base_index=0)
        return impl.merge_batch(batch, t=torch.tensor([params["t"]], dtype=torch.float32))[0]
    if method in GROUP_METHODS:
        return _merge_group(impl, base, tensors, params)
    group = TensorGroup.from_tensors([base, *tensors], base_index=0)
    if method == "model_stock":
        return impl.merge_group(group, filter_wise=params.get("filter_wise", False))
    spec_defaults = {p.name: p.default for p in impl.spec.parameters}
    call: Dict[str, Any] = {}
    for name, default in spec_defaults.items():
        value = params.get(name, default)
        if name in GTA_DEFAULT_KEYS:
            call[name] = value
        else:
            if not isinstance(value, (int, float, list, tuple)):  # mergekit's "required" marker
                value = 1.0
            call[name] = dict(zip(range(1, n + 1), _per_model(value, n)))
    with _injected_bernoulli(masks):
        return impl.merge_group(group, **call)


def _merge_group(impl, base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor], params: Dict[str, Any]):
    """A TensorGroup method; a per-model `weight` goes to the non-base entries in order."""
    from mergekit.merge_methods.base import PerInputValues, TensorGroup

    group = TensorGroup.from_tensors(([base] if base is not None else []) + list(tensors),
                                     base_index=0 if base is not None else None)
    call = dict(params)
    if "weight" in call:
        ids = [entry.id for entry in group.non_base]
        call["weight"] = PerInputValues(list(zip(ids, _per_model(call["weight"], len(ids)))))
    return impl.merge_group(group, **call)


def _per_model(value, n: int) -> List[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n
