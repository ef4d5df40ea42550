"""Numeric plans: a method spec plus checked parameters, turned into per-model keep rules.

The backends (reference, CPU extension, Triton) all execute the same `GtaPlan`; nothing in a
plan depends on tiling, chunking or the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from moefuse.errors import MergeConfigError
from moefuse.methods import MethodSpec, ResolvedParams

KEEP_ALL = "all"
KEEP_NONE = "none"
KEEP_RANKS = "ranks"  # keep descending-magnitude ranks [rank_lo, rank_hi)
KEEP_RANDOM = "random"  # keep iff philox(seed, i, j) < threshold32
KEEP_DELLA = "della"  # keep with a probability set by the entry's rank in its row

RESCALE_FLOOR = 1e-7  # below this L1 norm (before or after) mergekit leaves the mask unscaled


@dataclass(frozen=True)
class KeepRule:
    """Which entries of one model's task vector survive sparsification."""

    kind: str
    rank_lo: int = 0
    rank_hi: int = 0
    threshold32: int = 0  # KEEP_RANDOM: keep iff the 32-bit draw is below this (0 .. 2**32)
    density: float = 1.0
    epsilon: float = 0.0

    @property
    def sparse(self) -> bool:
        """True when the rule may drop entries (so rescaling applies)."""
        return self.kind != KEEP_ALL


@dataclass(frozen=True)
class GtaPlan:
    rules: Tuple[KeepRule, ...]
    weights: Tuple[float, ...]
    consensus: bool
    normalize: bool
    lam: float
    rescale: Optional[str]  # None, "l1" or "inverse_density"
    seed: int

    @property
    def num_models(self) -> int:
        return len(self.rules)

    def static_scales(self) -> Optional[List[float]]:
        """Rescale factors known without looking at data (None when they need L1 norms)."""
        if self.rescale == "l1" and any(rule.sparse for rule in self.rules):
            return None
        if self.rescale == "inverse_density":
            return [
                1.0 / rule.density if rule.sparse and rule.density > 0 else 1.0 for rule in self.rules
            ]
        return [1.0] * self.num_models

    def l1_scales(self, before: Sequence[float], after: Sequence[float]) -> List[float]:
        """Rescale factors from each model's L1 norms before and after its mask."""
        return [l1_rescale(b, a) if rule.sparse else 1.0 for b, a, rule in zip(before, after, self.rules)]


def l1_rescale(before: float, after: float) -> float:
    """mergekit's L1 rescale: ||d||_1 / ||kept d||_1, or 1 when either norm is tiny."""
    if before < RESCALE_FLOOR or after < RESCALE_FLOOR:
        return 1.0
    return before / after


def keep_rule(spec: MethodSpec, numel: int, density: float, gamma: float, epsilon: float) -> KeepRule:
    """The keep rule of one model for a tensor of `numel` entries (see `moefuse.methods.gta`)."""
    kind = spec.sparsifier
    if kind is None or density >= 1.0 or numel == 0:
        return KeepRule(KEEP_ALL)
    if kind == "magnitude":
        if density <= 0.0:
            return KeepRule(KEEP_NONE, density=density)
        return KeepRule(KEEP_RANKS, 0, max(1, int(density * numel)), density=density)
    if kind == "breadcrumbs":
        kept = int(density * numel)
        top = int(gamma * numel)
        bottom = max(0, numel - kept - top)
        return KeepRule(KEEP_RANKS, numel - bottom - kept, numel - bottom, density=density)
    if kind == "random":
        return KeepRule(KEEP_RANDOM, threshold32=int(density * 2**32), density=density)
    if kind == "della":
        if density <= 0.0:
            return KeepRule(KEEP_NONE, density=density)
        if density + epsilon >= 1.0 or density - epsilon <= 0.0:
            raise MergeConfigError(
                f"method '{spec.name}': density {density} +/- epsilon {epsilon} must stay inside "
                "(0, 1); lower epsilon"
            )
        return KeepRule(KEEP_DELLA, density=density, epsilon=epsilon)
    raise AssertionError(f"unhandled sparsifier {kind!r}")


def gta_plan(spec: MethodSpec, params: ResolvedParams, numel: int) -> GtaPlan:
    per_model, shared = params.per_model, params.shared
    num_models = len(per_model["weight"])
    zeros = [0.0] * num_models
    rules = tuple(
        keep_rule(spec, numel, density, gamma, epsilon)
        for density, gamma, epsilon in zip(
            per_model["density"], per_model.get("gamma", zeros), per_model.get("epsilon", zeros)
        )
    )
    return GtaPlan(
        rules=rules,
        weights=tuple(per_model["weight"]),
        consensus=spec.consensus,
        normalize=shared["normalize"],
        lam=shared["lambda"],
        rescale=shared["rescale_mode"] if shared["rescale"] else None,
        seed=shared.get("seed", 0),
    )
