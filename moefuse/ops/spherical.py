"""The coefficients of the spherical methods (nuslerp, multislerp, karcher) from Gram matrices,
and nuslerp per vector. Math: `moefuse.methods.spherical`.

Every spherical merge is out = sum_i c_i X_i over the points X_i (task vectors when a base is
used); the functions here compute c from G_ij = <X_i, X_j> in float64, on the host, so the
backends only ever run a Gram pass and a weighted sum.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from moefuse.errors import MergeConfigError, MergeInputError
from moefuse.ops.pieces import Pieces

NUSLERP_NORM_FLOOR = 1e-7
# |cos| at or above this (4 fp32 ulps below 1): linear interpolation. mergekit interpolates
# linearly where its fp32 cosine is exactly +-1; Gram sums round differently, and in between its
# formula gives the linear result to 1e-7 (theta near 0) or amplified rounding noise (near pi).
NUSLERP_COLINEAR_COS = 1 - 2**-22
NUSLERP_WEIGHT_FLOOR = 1e-6  # |w_0 + w_1| below this: t = 0.5


def nuslerp_t(weights: Sequence[float]) -> float:
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < NUSLERP_WEIGHT_FLOOR else weights[1] / total


def nuslerp_coefficients(gram: torch.Tensor, t: float) -> torch.Tensor:
    """(c_0, c_1) of out = c_0 X_0 + c_1 X_1 for Gram matrices [..., 2, 2] (float64 [..., 2])."""
    norm0 = gram[..., 0, 0].clamp(min=0).sqrt().clamp(min=NUSLERP_NORM_FLOOR)
    norm1 = gram[..., 1, 1].clamp(min=0).sqrt().clamp(min=NUSLERP_NORM_FLOOR)
    cos = (gram[..., 0, 1] / (norm0 * norm1)).clamp(-1, 1)
    colinear = cos.abs() >= NUSLERP_COLINEAR_COS
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))  # sin(theta) = 1 where colinear
    spherical = torch.stack([torch.sin((1 - t) * theta), torch.sin(t * theta)], dim=-1) / torch.sin(theta)[..., None]
    linear = torch.tensor([1 - t, t], dtype=gram.dtype, device=gram.device).expand_as(spherical)
    return torch.where(colinear[..., None], linear, spherical)


def multislerp_coefficients(gram: torch.Tensor, weights: Sequence[float], normalize: bool, eps: float) -> List[float]:
    """c_i = (sum_j w_j |X_j|) w_i / ((|X_i| + eps) |m|), m = sum_j w_j X_j / (|X_j| + eps)."""
    count = gram.shape[0]
    if count == 1:
        return [1.0]
    if normalize:
        total = math.fsum(weights)
        if total == 0:
            raise MergeConfigError("method 'multislerp': the weights sum to zero, so they cannot be normalized; "
                                   "change the weights or set normalize_weights: false")
        weights = [w / total for w in weights]
    w = torch.tensor(weights, dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()
    scaled = w / (norms + eps)
    mean_norm = math.sqrt(max(0.0, (scaled @ gram @ scaled).item()))
    if not norms.any():  # every point is zero (e.g. no model changed this tensor): so is the result
        return [0.0] * count
    if mean_norm < eps:
        if count == 2:
            return list(weights)
        raise MergeInputError("method 'multislerp': the weighted sum of the unit vectors is zero (antipodal inputs "
                              "whose weights cancel); change the weights")
    return (scaled * (w @ norms).item() / mean_norm).tolist()


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> List[float]:
    """c_i = (sum_j |X_j| / N) p_i / |X_i|, p the Karcher mean's coefficients over the unit vectors."""
    count = gram.shape[0]
    if count == 1:
        return [1.0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(count) if norms[i].item() > tol]
    if not valid:
        return [0.0] * count
    unit_gram = gram[valid][:, valid] / torch.outer(norms[valid], norms[valid])
    alpha = 1.0 / len(valid)

    def length(p: torch.Tensor) -> float:
        return math.sqrt(max(0.0, (p @ unit_gram @ p).item()))

    p = torch.full((len(valid),), alpha, dtype=torch.float64)
    p = p / length(p) if length(p) >= tol else torch.eye(len(valid), dtype=torch.float64)[0]
    for _ in range(max_iter):
        dots = (unit_gram @ p).clamp(-1, 1)
        tangent = torch.zeros_like(p)
        for j, dot in enumerate(dots.tolist()):
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent -= alpha * theta / math.sin(theta) * dot * p
            tangent[j] += alpha * theta / math.sin(theta)
        step = length(tangent)
        if step < tol:
            break
        p = math.cos(step) * p + math.sin(step) * tangent / step
        if length(p) > tol:
            p = p / length(p)
    scale = norms.sum().item() / count
    coefficients = [0.0] * count
    for position, i in enumerate(valid):
        coefficients[i] = scale * p[position].item() / norms[i].item()
    return coefficients


def vector_groups(shape: Tuple[int, ...], row_wise: bool) -> Tuple[int, Callable[[int, int, torch.device], torch.Tensor]]:
    """nuslerp's vectors when not flattened: (count, group(start, stop, device)), where group gives the
    vector each flat index in [start, stop) belongs to. Vectors run along the last dimension, or the
    first with `row_wise`; a tensor of fewer than two dimensions is one vector."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return 1, lambda start, stop, device: torch.zeros(stop - start, dtype=torch.int64, device=device)
    if row_wise:
        count = numel // shape[0]
        return count, lambda start, stop, device: torch.arange(start, stop, device=device) % count
    length = shape[-1]
    return numel // length, lambda start, stop, device: torch.arange(start, stop, device=device) // length


def nuslerp_vectorwise(base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor], shape: Tuple[int, ...],
                       t: float, row_wise: bool, pieces: Pieces,
                       count_nonfinite: Callable[[List[torch.Tensor]], List[int]]) -> Tuple[List[int], Iterator[torch.Tensor]]:
    """nuslerp of each vector (flat tensors, read piece by piece): the NaN/Inf counts of the inputs
    (base first, by `count_nonfinite` of a piece's operands) from a first pass of per-vector Gram
    matrices, and an iterator over the fp32 output pieces (the second pass)."""
    operands = ([base] if base is not None else []) + list(tensors)
    count, group = vector_groups(shape, row_wise)
    device = tensors[0].device
    gram = torch.zeros(count, 3, dtype=torch.float64, device=device)  # G00, G01, G11 per vector
    nonfinite = [0] * len(operands)
    for start, stop, piece in pieces.walk(operands):
        nonfinite = [a + b for a, b in zip(nonfinite, count_nonfinite(piece))]
        x0, x1 = _points(piece, base is not None)
        x0, x1 = x0.double(), x1.double()
        gram.index_add_(0, group(start, stop, device), torch.stack([x0 * x0, x0 * x1, x1 * x1], dim=1))
    full = torch.stack([gram[:, 0], gram[:, 1], gram[:, 1], gram[:, 2]], dim=1).reshape(count, 2, 2)
    coefficients = nuslerp_coefficients(full, t).float()

    def outputs() -> Iterator[torch.Tensor]:
        for start, stop, piece in pieces.walk(operands):
            c = coefficients[group(start, stop, device)]
            x0, x1 = _points(piece, base is not None)
            out = c[:, 0] * x0 + c[:, 1] * x1
            yield out + piece[0].float() if base is not None else out

    return nonfinite, outputs()


def _points(piece: Sequence[torch.Tensor], has_base: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two points of a nuslerp piece in fp32: task vectors when the base leads the operands."""
    if has_base:
        base = piece[0].float()
        return piece[1].float() - base, piece[2].float() - base
    return piece[0].float(), piece[1].float()


def point_coefficients(method: str, params, gram: torch.Tensor) -> List[float]:
    """c_i of out = sum_i c_i X_i for spherical method `method` with resolved `params`."""
    if method == "nuslerp":
        return nuslerp_coefficients(gram, nuslerp_t(params.per_model["weight"])).tolist()
    if method == "multislerp":
        shared = params.shared
        return multislerp_coefficients(gram, params.per_model["weight"], shared["normalize_weights"], shared["eps"])
    if method == "karcher":
        return karcher_coefficients(gram, params.shared["max_iter"], params.shared["tol"])
    raise AssertionError(f"unhandled spherical method {method!r}")


def with_base(coefficients: Sequence[float], has_base: bool) -> List[float]:
    """Coefficients on [B, X_1 + B, ...] for B + sum_i c_i X_i: (1 - sum_i c_i, c_1, ...)."""
    return [1.0 - math.fsum(coefficients), *coefficients] if has_base else list(coefficients)
