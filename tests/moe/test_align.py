"""Weight matching of SwiGLU FFNs: permuted copies are recovered exactly, aligned FFNs compute the
same function, and the matched permutation is the brute-force optimum on small widths."""

from __future__ import annotations

import itertools

import pytest
import torch

from moefuse.errors import MoeInputError
from moefuse.moe.align import SwiGLU, align_ffn, match_ffn, neuron_features, permute_ffn


def _ffn(width: int, hidden: int, seed: int, dtype=torch.float32) -> SwiGLU:
    generator = torch.Generator().manual_seed(seed)
    return SwiGLU(*(torch.randn(shape, generator=generator, dtype=dtype) / hidden**0.5
                    for shape in ((width, hidden), (width, hidden), (hidden, width))))


@pytest.mark.parametrize("width,hidden", [(1, 4), (7, 5), (96, 48), (352, 64)])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_recovers_random_permutation(width, hidden, with_inputs):
    reference = _ffn(width, hidden, seed=width)
    shuffle = torch.randperm(width, generator=torch.Generator().manual_seed(1))
    other = permute_ffn(reference, shuffle)  # other's neuron k is reference's neuron shuffle[k]
    inputs = torch.randn(32, hidden, generator=torch.Generator().manual_seed(2)) if with_inputs else None
    perm = match_ffn(reference, other, inputs)
    assert torch.equal(perm, torch.argsort(shuffle))
    aligned = permute_ffn(other, perm)
    for got, want in zip(aligned, reference):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_recovers_permutation_of_a_noisy_copy(dtype):
    reference = _ffn(128, 64, seed=3)
    generator = torch.Generator().manual_seed(4)
    noisy = SwiGLU(*(t + 0.1 * t.std() * torch.randn(t.shape, generator=generator) for t in reference))
    shuffle = torch.randperm(128, generator=generator)
    other = permute_ffn(SwiGLU(*(t.to(dtype) for t in noisy)), shuffle)
    assert torch.equal(match_ffn(SwiGLU(*(t.to(dtype) for t in reference)), other), torch.argsort(shuffle))


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_permuted_ffn_computes_the_same_function(dtype, atol):
    ffn = _ffn(200, 48, seed=5, dtype=dtype)
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(6), dtype=dtype)
    other = _ffn(200, 48, seed=7, dtype=dtype)
    aligned = align_ffn(other, ffn, inputs=x)
    assert not torch.equal(aligned.gate, ffn.gate)  # some neurons moved
    torch.testing.assert_close(aligned.forward(x), ffn.forward(x), atol=atol, rtol=0)


def test_matching_is_the_brute_force_optimum():
    for seed in range(5):
        reference, other = _ffn(6, 3, seed=seed), _ffn(6, 3, seed=seed + 100)
        similarity = neuron_features(reference) @ neuron_features(other).t()
        best = max(itertools.permutations(range(6)), key=lambda p: float(similarity[range(6), list(p)].sum()))
        assert match_ffn(reference, other).tolist() == list(best)


def test_fused_layout_round_trip():
    ffn = _ffn(10, 6, seed=8)
    gate_up = ffn.fused()
    assert gate_up.shape == (20, 6)
    again = SwiGLU.from_fused(gate_up, ffn.down)
    assert all(torch.equal(a, b) for a, b in zip(again, ffn))


def test_bad_inputs():
    ffn = _ffn(8, 4, seed=9)
    with pytest.raises(MoeInputError, match="gate"):
        match_ffn(ffn, SwiGLU(ffn.gate, ffn.up, ffn.down.t()))
    with pytest.raises(MoeInputError, match="different shapes"):
        match_ffn(ffn, _ffn(9, 4, seed=1))
    with pytest.raises(MoeInputError, match="permutation"):
        permute_ffn(ffn, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
