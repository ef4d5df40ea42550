"""Weight matching of gated feed-forward blocks (SwiGLU) by permuting their intermediate neurons.

A SwiGLU FFN computes f(x) = down @ (act(gate @ x) * (up @ x)) with gate, up [I, H] and down [H, I].
Permuting its I intermediate neurons (rows of gate and up, columns of down, by the same permutation)
leaves f unchanged. Two FFNs trained from different starts may hold similar neurons in different
slots; averaging them slot by slot mixes unrelated neurons. `match_ffn` finds the permutation of one
FFN's neurons that best matches another's (a linear assignment maximizing total similarity) and
`permute_ffn` applies it, so a merge averages matching neurons.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from moefuse.errors import MoeInputError
from moefuse.ops.assignment import linear_assignment


class SwiGLU(NamedTuple):
    """The weights of one gated FFN: gate [I, H], up [I, H], down [H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def from_fused(cls, gate_up: torch.Tensor, down: torch.Tensor) -> "SwiGLU":
        """From transformers' fused expert layout: gate_up [2I, H] (gate rows first), down [H, I]."""
        gate, up = gate_up.chunk(2, dim=0)
        return cls(gate, up, down)

    def fused(self) -> torch.Tensor:
        """gate_up [2I, H], the inverse of `from_fused`."""
        return torch.cat([self.gate, self.up], dim=0)

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def forward(self, x: torch.Tensor, act=F.silu) -> torch.Tensor:
        """f(x) = (act(x gate^T) * (x up^T)) down^T for x [..., H]."""
        return (act(x @ self.gate.t()) * (x @ self.up.t())) @ self.down.t()


def _check(ffn: SwiGLU, name: str) -> None:
    gate, up, down = ffn
    if gate.dim() != 2 or gate.shape != up.shape or down.shape != (gate.shape[1], gate.shape[0]):
        raise MoeInputError(
            f"{name}: a SwiGLU FFN needs gate [I, H], up [I, H] and down [H, I]; got gate {list(gate.shape)}, "
            f"up {list(up.shape)}, down {list(down.shape)}"
        )


def neuron_features(ffn: SwiGLU, inputs: Optional[torch.Tensor] = None, act=F.silu) -> torch.Tensor:
    """Features of the intermediate neurons, one row each (float32).

    Without `inputs`: [gate_k, up_k, down[:, k]] of neuron k, concatenated (width 3H). With calibration
    `inputs` [T, H]: the unit-normalized weight features next to the unit-normalized activations
    act(gate_k . x_t) * (up_k . x_t) over the T inputs, so both count equally.
    """
    gate, up, down = (t.float() for t in ffn)
    weights = torch.cat([gate, up, down.t()], dim=1)
    if inputs is None:
        return weights
    x = inputs.reshape(-1, gate.shape[1]).float()
    activations = (act(x @ gate.t()) * (x @ up.t())).t()
    return torch.cat([F.normalize(weights, dim=1), F.normalize(activations, dim=1)], dim=1)


def match_ffn(reference: SwiGLU, other: SwiGLU, inputs: Optional[torch.Tensor] = None, act=F.silu) -> torch.Tensor:
    """The permutation `perm` (int64 [I]) of `other`'s neurons that best matches `reference`'s:
    it maximizes sum_k <phi_ref(k), phi_other(perm[k])> over permutations, with phi the neuron
    features of `neuron_features` (weights, plus activations on `inputs` if given). Apply it with
    `permute_ffn(other, perm)`: aligned neuron k is other's neuron perm[k]."""
    _check(reference, "reference FFN")
    _check(other, "other FFN")
    if reference.gate.shape != other.gate.shape:
        raise MoeInputError(
            f"cannot match FFNs of different shapes: gate {list(reference.gate.shape)} vs {list(other.gate.shape)}"
        )
    similarity = neuron_features(reference, inputs, act) @ neuron_features(other, inputs, act).t()
    _, perm = linear_assignment(similarity.double().cpu(), maximize=True)
    return perm.to(reference.gate.device)


def permute_ffn(ffn: SwiGLU, perm: torch.Tensor) -> SwiGLU:
    """The same function with its neurons reordered: gate[perm], up[perm], down[:, perm]."""
    _check(ffn, "FFN")
    perm = perm.to(ffn.gate.device)
    if perm.shape != (ffn.width,) or not torch.equal(torch.sort(perm).values, torch.arange(ffn.width, device=perm.device)):
        raise MoeInputError(f"perm must be a permutation of range({ffn.width}), got shape {list(perm.shape)}")
    return SwiGLU(ffn.gate[perm], ffn.up[perm], ffn.down[:, perm])


def align_ffn(reference: SwiGLU, other: SwiGLU, inputs: Optional[torch.Tensor] = None, act=F.silu) -> SwiGLU:
    """`other` with its neurons permuted to match `reference` (same function as `other`)."""
    return permute_ffn(other, match_ffn(reference, other, inputs, act))
