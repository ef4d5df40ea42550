"""The coefficients of the spherical methods (nuslerp, multislerp, karcher) from Gram matrices,
and nuslerp per vector. Math: `moefuse.methods.spherical`.

Every spherical merge is out = sum_i c_i X_i over the points X_i (or B + sum_i c_i (T_i - B) over
task vectors when a base is used); the functions here compute c from G_ij = <X_i, X_j> in
float64, on the host, so the backends only ever run a Gram pass and a weighted sum (or the fused
task-arithmetic pass). nuslerp per vector runs as torch operations on chunks of whole rows.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from moefuse.errors import MergeConfigError, MergeInputError
from moefuse.methods import ResolvedParams
from moefuse.ops.pieces import CountNonfinite, Pieces, add_counts, torch_chunk
from moefuse.ops.plan import KEEP_ALL, GtaPlan, KeepRule

NUSLERP_NORM_FLOOR = 1e-7
# |cos| at or above this (4 fp32 ulps below 1): linear interpolation. mergekit interpolates
# linearly where its fp32 cosine is exactly +-1; Gram sums round differently, and in between its
# formula gives the linear result to 1e-7 (theta near 0) or amplified rounding noise (near pi).
NUSLERP_COLINEAR_COS = 1 - 2**-22
NUSLERP_WEIGHT_FLOOR = 1e-6  # |w_0 + w_1| below this: t = 0.5


def nuslerp_t(weights: Sequence[float]) -> float:
    """nuslerp's interpolation factor from the two models' weights."""
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
    size = length(p)
    p = p / size if size >= tol else torch.eye(len(valid), dtype=torch.float64)[0]
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
        size = length(p)
        if size > tol:
            p = p / size
    scale = norms.sum().item() / count
    coefficients = [0.0] * count
    for position, i in enumerate(valid):
        coefficients[i] = scale * p[position].item() / norms[i].item()
    return coefficients


def nuslerp_vectorwise(base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor], shape: Tuple[int, ...],
                       t: float, row_wise: bool, pieces: Pieces, count_nonfinite: CountNonfinite
                       ) -> Tuple[List[int], Iterator[torch.Tensor]]:
    """nuslerp of each vector of a tensor of at least two dimensions (flat operands, base first if
    any): along the last dimension (the rows of a [numel / shape[-1], shape[-1]] view), or with
    `row_wise` along the first (the columns of a [shape[0], numel / shape[0]] view). Returns the
    NaN/Inf counts of the operands (`count_nonfinite` of each chunk's), found by a first pass of
    per-vector Gram sums in fp64, and an iterator over the fp32 output chunks (the second pass).
    Chunks hold whole rows: at most min(pieces.size, `torch_chunk`) entries, or one row if longer."""
    operands = ([base] if base is not None else []) + list(tensors)
    numel = math.prod(shape)
    if numel == 0:
        return [0] * len(operands), iter([torch.zeros(0, device=tensors[0].device)])
    width = numel // shape[0] if row_wise else shape[-1]
    chunks = pieces.resized(max(1, min(pieces.size, torch_chunk(tensors[0].device)) // width) * width)
    sums = torch.zeros(3, width if row_wise else numel // width, dtype=torch.float64, device=tensors[0].device)
    nonfinite = [0] * len(operands)
    for start, stop, piece in chunks.walk(operands):
        nonfinite = add_counts(nonfinite, count_nonfinite(piece))
        x0, x1 = (x.double() for x in _points(piece, base is not None, width))
        products = torch.stack([x0 * x0, x0 * x1, x1 * x1])  # [3, rows of the chunk, width]
        if row_wise:
            sums += products.sum(dim=1)
        else:
            sums[:, start // width:stop // width] = products.sum(dim=2)
    gram = torch.stack([sums[0], sums[1], sums[1], sums[2]], dim=1).reshape(-1, 2, 2)
    coefficients = nuslerp_coefficients(gram, t).float()  # [vectors, 2]

    def outputs() -> Iterator[torch.Tensor]:
        for start, stop, piece in chunks.walk(operands):
            x0, x1 = _points(piece, base is not None, width)
            c = coefficients[None] if row_wise else coefficients[start // width:stop // width, None]
            out = c[..., 0] * x0 + c[..., 1] * x1
            if base is not None:
                out += piece[0].float().reshape(out.shape)
            yield out.reshape(-1)

    return nonfinite, outputs()


def _points(piece: Sequence[torch.Tensor], has_base: bool, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two points of a nuslerp chunk as fp32 [rows, width]: task vectors when the base leads."""
    rows = [x.float().reshape(-1, width) for x in piece]
    if has_base:
        return rows[1] - rows[0], rows[2] - rows[0]
    return rows[0], rows[1]


def point_coefficients(method: str, params: ResolvedParams, gram: torch.Tensor) -> List[float]:
    """c_i of out = sum_i c_i X_i for spherical method `method` with resolved `params`."""
    if method == "nuslerp":
        return nuslerp_coefficients(gram, nuslerp_t(params.per_model["weight"])).tolist()
    if method == "multislerp":
        shared = params.shared
        return multislerp_coefficients(gram, params.per_model["weight"], shared["normalize_weights"], shared["eps"])
    if method == "karcher":
        return karcher_coefficients(gram, params.shared["max_iter"], params.shared["tol"])
    raise AssertionError(f"unhandled spherical method {method!r}")


def task_arithmetic_plan(coefficients: Sequence[float]) -> GtaPlan:
    """B + sum_i c_i (T_i - B) as a plan of the fused task-arithmetic pass (all entries kept, no
    normalization), for the spherical merges with a base: summing the task vectors, not
    (1 - sum_i c_i) B + sum_i c_i T_i, keeps the result exact where some c_i are large (a model
    that barely changed a tensor gets c_i ~ 1 / |T_i - B| in multislerp and karcher)."""
    return GtaPlan(rules=(KeepRule(KEEP_ALL),) * len(coefficients), weights=tuple(coefficients), consensus=False,
                   normalize=False, lam=1.0, rescale=None, seed=0)
