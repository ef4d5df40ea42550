"""Plain PyTorch reference of every merge method: whole tensors, sorting, no tricks.

This is the semantic ground truth the fast paths are tested against. It allocates several
copies of the tensor; use it for checking, not for big merges. Math: see `moefuse.methods`.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch

from moefuse.ops.philox import philox_uint32, uniform_from_uint32
from moefuse.ops.plan import (
    KEEP_ALL,
    KEEP_DELLA,
    KEEP_NONE,
    KEEP_RANDOM,
    KEEP_RANKS,
    GtaPlan,
    KeepRule,
)
from moefuse.ops.sce import erase_and_average, sce_weights, selected_count
from moefuse.ops.spherical import nuslerp_coefficients

SLERP_DOT_THRESHOLD = 0.9995
SLERP_NORM_EPS = 1e-8


def magnitude_keys(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as its IEEE bit pattern in delta's own dtype (int64): orders like |delta|."""
    flat = delta.reshape(-1).abs()
    int_type = torch.int32 if flat.element_size() == 4 else torch.int16
    return flat.view(int_type).to(torch.int64)


def rank_order(delta: torch.Tensor) -> torch.Tensor:
    """Flat indices by descending |delta|; equal magnitudes in increasing index order."""
    return torch.sort(magnitude_keys(delta), descending=True, stable=True).indices


def della_rank_probabilities(length: int, density: float, epsilon: float, device=None) -> torch.Tensor:
    """Keep probability of each ascending rank r in a row of `length` (float64 [length], on
    `device`): rho - eps + 2 eps r / (length - 1); a row of length 1 gets rho."""
    ranks = torch.arange(length, dtype=torch.float64, device=device)
    spread = ranks / (length - 1) if length > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon) + spread * (2 * epsilon)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability (float64, delta's shape): `della_rank_probabilities` of the
    entry's ascending |delta| rank within its row along dim 1 (ties by index)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    keys = magnitude_keys(rows).reshape(rows.shape)
    order = torch.sort(keys, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    position = torch.arange(rows.shape[1], dtype=order.dtype).reshape(
        (1, -1) + (1,) * (rows.dim() - 2)
    ).expand_as(order)
    ranks.scatter_(1, order, position)
    table = della_rank_probabilities(rows.shape[1], density, epsilon, delta.device)
    return table[ranks].reshape(delta.shape)


def keep_mask(delta: torch.Tensor, rule: KeepRule, seed: int, model_index: int, offset: int = 0) -> torch.Tensor:
    """Boolean mask of the entries of model `model_index`'s delta that `rule` keeps; `offset` is
    the flat index of delta's first entry in the whole tensor (random draws follow it)."""
    n = delta.numel()
    if rule.kind == KEEP_ALL:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if rule.kind == KEEP_NONE:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    if rule.kind == KEEP_RANKS:
        mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
        mask[rank_order(delta)[rule.rank_lo : rule.rank_hi]] = True
        return mask.reshape(delta.shape)
    offsets = torch.arange(offset, offset + n, dtype=torch.int64, device=delta.device)
    bits = philox_uint32(seed, model_index, offsets).reshape(delta.shape)
    if rule.kind == KEEP_RANDOM:
        return bits < rule.threshold32
    if rule.kind == KEEP_DELLA:
        return uniform_from_uint32(bits) < della_probabilities(delta, rule.density, rule.epsilon)
    raise AssertionError(rule.kind)


def combine(base: torch.Tensor, kept: torch.Tensor, plan: GtaPlan, scales: Sequence[float]) -> torch.Tensor:
    """The GTA combine step on fp32 kept deltas `kept` [N, ...]: weights, sign election,
    normalization, lambda. Returns base + lambda * M in fp32."""
    coeff = torch.tensor(
        [w * s for w, s in zip(plan.weights, scales)], dtype=torch.float32, device=base.device
    ).reshape((-1,) + (1,) * base.dim())
    weights = torch.tensor(plan.weights, dtype=torch.float32, device=base.device).reshape(coeff.shape)
    contributions = kept * coeff
    if plan.consensus:
        majority = torch.where(contributions.sum(dim=0) >= 0, 1.0, -1.0)
        agree = torch.sign(contributions) == majority
        mixed = (contributions * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = contributions.sum(dim=0)
        total = float(sum(plan.weights))
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, device=base.device)
    if plan.normalize:
        mixed = mixed / divisor
    return base.float() + mixed * plan.lam


def task_vectors(base: torch.Tensor, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """fp32 deltas x - base, rounded to the input dtype first (then exact in fp32)."""
    return [(x - base).float() for x in inputs]


def keep_masks(deltas: Sequence[torch.Tensor], plan: GtaPlan, offset: int = 0) -> List[torch.Tensor]:
    return [keep_mask(d, rule, plan.seed, i, offset) for i, (d, rule) in enumerate(zip(deltas, plan.rules))]


def l1_norms_reference(deltas: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 [N, 2]: ||d_i||_1 and ||kept d_i||_1 per model."""
    return torch.tensor([[d.double().abs().sum().item(), (d.double().abs() * m).sum().item()]
                         for d, m in zip(deltas, masks)], dtype=torch.float64).reshape(-1, 2)


def combine_kept(base: torch.Tensor, deltas: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], plan: GtaPlan,
                 scales: Sequence[float]) -> torch.Tensor:
    """`combine` of the masked deltas (base in fp32 when there are none)."""
    if not deltas:
        return base.float()
    return combine(base, torch.stack([d * m for d, m in zip(deltas, masks)]), plan, scales)


def gta_reference(base: torch.Tensor, inputs: Sequence[torch.Tensor], plan: GtaPlan) -> torch.Tensor:
    """Generalized task arithmetic, fp32 result (see `moefuse.methods.gta`)."""
    deltas = task_vectors(base, inputs)
    masks = keep_masks(deltas, plan)
    scales = plan.static_scales()
    if scales is None:
        norms = l1_norms_reference(deltas, masks)
        scales = plan.l1_scales(norms[:, 0].tolist(), norms[:, 1].tolist())
    return combine_kept(base, deltas, masks, plan, scales)


def weighted_sum_reference(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """sum_j c_j T_j accumulated in fp32 in input order (fp32 result)."""
    out = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for tensor, c in zip(tensors, coefficients):
        out += tensor.float() * c
    return out


def gram_reference(tensors: Sequence[torch.Tensor], base=None) -> torch.Tensor:
    """Gram matrix G[a, b] = <T_a - base, T_b - base> in float64 (base optional)."""
    flat = [
        ((t - base) if base is not None else t).reshape(-1).double() for t in tensors
    ]
    stacked = torch.stack(flat) if flat else torch.zeros(0, 0, dtype=torch.float64)
    return stacked @ stacked.T


def linear_coefficients(weights: Sequence[float], normalize: bool) -> List[float]:
    total = float(sum(weights))
    if not normalize:
        return list(weights)
    return [w / total for w in weights]


def slerp_coefficients(gram: torch.Tensor, t: float) -> List[float]:
    """Coefficients (c_A, c_B) of out = c_A A + c_B B from the Gram matrix of [A, B]."""
    norm_a, norm_b = math.sqrt(gram[0, 0].item()), math.sqrt(gram[1, 1].item())
    norm_a = norm_a if norm_a > SLERP_NORM_EPS else 1.0
    norm_b = norm_b if norm_b > SLERP_NORM_EPS else 1.0
    dot = max(-1.0, min(1.0, gram[0, 1].item() / (norm_a * norm_b)))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return [1.0 - t, t]
    theta = math.acos(dot)
    return [math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]


def model_stock_t(gram: torch.Tensor) -> torch.Tensor:
    """Model Stock's interpolation factor from Gram matrices [..., N, N] of the task vectors (only
    their diagonal and upper triangle are read)."""
    count = gram.shape[-1]
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).sqrt()
    pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
    cosines = torch.stack(
        [
            (gram[..., a, b] / (norms[..., a] * norms[..., b]).clamp(min=1e-6)).clamp(-1, 1)
            for a, b in pairs
        ]
    )
    cos = cosines.mean(dim=0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))


def model_stock_reference(base: torch.Tensor, inputs: Sequence[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock in fp32; with filter_wise one interpolation factor per filter (each vector
    along the last dimension)."""
    if not filter_wise or base.dim() == 0:
        t = model_stock_t(gram_reference(inputs, base)).item()
        return weighted_sum_reference([base, *inputs], [1 - t] + [t / len(inputs)] * len(inputs))
    rows = base.reshape(math.prod(base.shape[:-1]), base.shape[-1])  # -1 is ambiguous when a dim is 0
    deltas = torch.stack([(x - base).reshape(rows.shape).double() for x in inputs], dim=1)
    t = model_stock_t(deltas @ deltas.transpose(1, 2)).float().unsqueeze(-1)
    average = torch.stack([x.reshape(rows.shape).float() for x in inputs]).mean(dim=0)
    return (t * average + (1 - t) * rows.float()).reshape(base.shape)


def nuslerp_vectors_reference(base, tensors: Sequence[torch.Tensor], t: float, row_wise: bool) -> torch.Tensor:
    """nuslerp of each vector along the last dimension (the first with `row_wise`) in fp32."""
    points = [x.float() - base.float() if base is not None else x.float() for x in tensors]
    if points[0].dim() >= 2:
        points = [p.transpose(0, -1) if row_wise else p for p in points]
    rows = [p.reshape(math.prod(p.shape[:-1]), p.shape[-1]) if p.dim() else p.reshape(1, 1) for p in points]
    stacked = torch.stack(rows, dim=1).double()  # [vectors, 2, length]
    coefficients = nuslerp_coefficients(stacked @ stacked.transpose(1, 2), t).float()
    out = (coefficients[:, :, None] * torch.stack(rows, dim=1)).sum(dim=1).reshape(points[0].shape)
    out = out.transpose(0, -1) if row_wise and out.dim() >= 2 else out
    return out + base.float() if base is not None else out


def nearswap_values(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """w B + (1 - w) A with w = clamp(t / max(|A - B|, 1e-6), 0, 1), in fp32 (A the base)."""
    a, b = base.float(), model.float()
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * b + (1 - weight) * a


def sce_reference(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE on whole tensors in fp32; the variance cut by a stable descending sort."""
    deltas = torch.stack([x.float() - base.float() for x in tensors]).reshape(len(tensors), -1)
    if select_topk < 1 and deltas.shape[1]:
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = selected_count(int((variance != 0).sum()), select_topk) if select_topk > 0 else 0
        keep = torch.zeros_like(variance, dtype=torch.bool)
        keep[torch.sort(variance, descending=True, stable=True).indices[:k]] = True
        deltas = deltas * keep
    weights = sce_weights((deltas * deltas).sum(dim=1, dtype=torch.float64).tolist(), max(deltas.shape[1], 1))
    merged = erase_and_average(deltas, weights)
    return base.float() + merged.reshape(base.shape)
