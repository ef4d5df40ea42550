"""Weight matching of gated feed-forward blocks (SwiGLU) by permuting their intermediate neurons.

A SwiGLU FFN computes f(x) = down @ (act(gate @ x) * (up @ x)) with gate, up [I, H] and down [H, I].
Permuting its I intermediate neurons (rows of gate and up, columns of down, by the same permutation)
leaves f unchanged. Two FFNs trained from different starts may hold similar neurons in different
slots; averaging them slot by slot mixes unrelated neurons. `match_ffn` finds the permutation of one
FFN's neurons that best matches another's (a linear assignment maximizing total similarity) and
`permute_ffn` applies it, so a merge averages matching neurons. `checkpoint_ffn_permutations` does
this for every layer of whole checkpoints (the `align: true` option of `moefuse merge`).
"""

from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

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
    return match_all(reference, [other], inputs, act)[0]


def match_all(reference: SwiGLU, others: Sequence[SwiGLU], inputs: Optional[torch.Tensor] = None,
              act=F.silu) -> List[torch.Tensor]:
    """`match_ffn(reference, other)` for each of `others`, computing the reference's features once."""
    _check(reference, "reference FFN")
    reference_features = neuron_features(reference, inputs, act)
    perms = []
    for other in others:
        _check(other, "other FFN")
        if reference.gate.shape != other.gate.shape:
            raise MoeInputError(
                f"cannot match FFNs of different shapes: gate {list(reference.gate.shape)} vs {list(other.gate.shape)}"
            )
        similarity = reference_features @ neuron_features(other, inputs, act).t()
        _, perm = linear_assignment(similarity.double().cpu(), maximize=True)
        perms.append(perm.to(reference.gate.device))
    return perms


def permute_ffn(ffn: SwiGLU, perm: torch.Tensor) -> SwiGLU:
    """The same function with its neurons reordered: gate[perm], up[perm], down[:, perm]."""
    _check(ffn, "FFN")
    perm = perm.to(ffn.gate.device)
    identity = torch.arange(ffn.width, device=perm.device)
    if perm.shape != (ffn.width,) or not torch.equal(torch.sort(perm).values, identity):
        raise MoeInputError(f"perm must be a permutation of range({ffn.width}), got shape {list(perm.shape)}")
    return SwiGLU(ffn.gate[perm], ffn.up[perm], ffn.down[:, perm])


def align_ffn(reference: SwiGLU, other: SwiGLU, inputs: Optional[torch.Tensor] = None, act=F.silu) -> SwiGLU:
    """`other` with its neurons permuted to match `reference` (same function as `other`)."""
    return permute_ffn(other, match_ffn(reference, other, inputs, act))


FFN_KEY = re.compile(r"^(?P<prefix>.*\.)gate_proj\.weight$")


def ffn_prefixes(keys) -> List[str]:
    """Prefixes P of the gated FFNs among checkpoint keys: P + {gate,up,down}_proj.weight all present
    (e.g. 'model.layers.3.mlp.')."""
    names = set(keys)
    found = [m.group("prefix") for k in names for m in [FFN_KEY.match(k)] if m]
    return sorted(p for p in found if f"{p}up_proj.weight" in names and f"{p}down_proj.weight" in names)


def checkpoint_ffn_permutations(reference, others) -> Dict[Tuple[int, str], Tuple[int, torch.Tensor]]:
    """Weight matching of every gated FFN of each checkpoint in `others` to `reference` (readers with
    `.keys()`, `.tensor(key)` and `.release(keys)`, as `moefuse.io.safetensors_reader.CheckpointReader`;
    each layer's FFN pages are released once it is matched). Returns, for (index in others, tensor
    key), the (dim, perm) to index that tensor with: rows of gate_proj and up_proj, columns of
    down_proj. Keys without an entry are left as they are."""
    prefixes = ffn_prefixes(reference.keys())
    if not prefixes:
        raise MoeInputError("align: no gated FFN (*.gate_proj/up_proj/down_proj.weight) tensors found to align")
    result: Dict[Tuple[int, str], Tuple[int, torch.Tensor]] = {}

    for prefix in prefixes:
        keys = [f"{prefix}{name}_proj.weight" for name in ("gate", "up", "down")]
        perms = match_all(SwiGLU(*(reference.tensor(k) for k in keys)),
                          [SwiGLU(*(other.tensor(k) for k in keys)) for other in others])
        for reader in (reference, *others):
            reader.release(keys)
        for index, perm in enumerate(perms):
            for key, dim in zip(keys, (0, 0, 1)):
                result[(index, key)] = (dim, perm)
    return result
