"""Counter-based random bits: Philox-4x32-10, the generator Triton's `tl.random` uses.

The draw for entry j of model i under `seed` is word j mod 4 of Philox-4x32-10 with key
(seed mod 2^32, seed >> 32) and counter (q mod 2^32, q >> 32, i, 0), q = j div 4: one Philox
evaluation serves four consecutive entries (the CPU kernels evaluate each block once; the Triton
kernels evaluate it per entry and pick the word). A draw depends on nothing else, so every
backend, tiling and chunk size draws the same mask.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
ROUNDS = 10


def _mul_hi_lo(a: int, b: torch.Tensor):
    # b < 2**32 and a < 2**32: the 64-bit product wraps in int64 but its bit pattern is exact.
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox_uint32(seed: int, stream: int, offsets: torch.Tensor) -> torch.Tensor:
    """Random 32-bit words (as int64 in [0, 2^32)) for int64 `offsets` in stream `stream`."""
    offsets = offsets.to(torch.int64)
    blocks = offsets >> 2
    c0 = blocks & _MASK32
    c1 = (blocks >> 32) & _MASK32
    c2 = torch.full_like(offsets, stream & _MASK32)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return torch.stack([c0, c1, c2, c3]).gather(0, (offsets & 3).unsqueeze(0)).squeeze(0)


def uniform_from_uint32(bits: torch.Tensor) -> torch.Tensor:
    """Map 32-bit draws to float64 uniforms in [0, 1) with 24 bits: (bits >> 8) / 2^24."""
    return (bits >> 8).to(torch.float64) * (1.0 / (1 << 24))
