"""Flat pieces: how a merge walks over tensors too large to hold in memory.

A merge reads its inputs in one or more passes (selection histograms, norms, the fused pass).
`Pieces` cuts the flat index range [0, n) into consecutive ranges of `size` entries; every pass
reads the inputs one range at a time, cast to the compute dtype, and calls `release(start, stop)`
once it is done with a range, so that a caller reading memory-mapped files can drop those pages.
`Pieces.whole(n)` is the single range of an in-memory merge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

TIE_CHUNK = 1 << 16  # granularity of tie counts (moefuse.ops.select); piece sizes are multiples
# Entries per chunk of the merges run with torch operations (SCE, NearSwap, nuslerp per vector):
TORCH_CHUNK = 1 << 16  # on a CPU, so that their temporaries stay in cache
GPU_TORCH_CHUNK = 1 << 22  # on a GPU, where each operation is a kernel launch
CountNonfinite = Callable[[List[torch.Tensor]], List[int]]  # a backend's NaN/Inf count of each tensor


def torch_chunk(device: torch.device) -> int:
    """Chunk size of the torch-operation merges on `device`."""
    return TORCH_CHUNK if device.type == "cpu" else GPU_TORCH_CHUNK


def add_counts(totals: Sequence[int], counts: Sequence[int]) -> List[int]:
    """Running NaN/Inf counts per operand."""
    return [a + b for a, b in zip(totals, counts)]


def _keep_pages(start: int, stop: int) -> None:
    """The default release: nothing to drop (the inputs are ordinary tensors)."""


@dataclass(frozen=True)
class Pieces:
    n: int
    size: int
    release: Callable[[int, int], None] = _keep_pages
    cast: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"piece size must be positive, got {self.size}")

    @staticmethod
    def whole(n: int) -> "Pieces":
        return Pieces(n, max(n, 1))

    @staticmethod
    def streaming(n: int, size: int, release: Optional[Callable[[int, int], None]] = None,
                  cast: Optional[torch.dtype] = None) -> "Pieces":
        """Ranges of `size` entries rounded up to a power of two of at least TIE_CHUNK, so that
        they tile with the tie chunks and the level-1 ranges of `moefuse.ops.select`."""
        size = 1 << (max(size, TIE_CHUNK) - 1).bit_length()
        return Pieces(n, size, release or _keep_pages, cast)

    def resized(self, size: int) -> "Pieces":
        """The same walk (release, cast) in ranges of `size` entries."""
        return replace(self, size=size)

    def ranges(self) -> Iterator[Tuple[int, int]]:
        """The ranges [start, stop) in order (one empty range when n == 0)."""
        for start in range(0, max(self.n, 1), self.size):
            yield start, min(self.n, start + self.size)

    def read(self, tensors: Sequence[torch.Tensor], start: int, stop: int) -> List[torch.Tensor]:
        """Range [start, stop) of each flat tensor, cast to the compute dtype."""
        return [t[start:stop] if self.cast is None else t[start:stop].to(self.cast) for t in tensors]

    def walk(self, tensors: Sequence[torch.Tensor]) -> Iterator[Tuple[int, int, List[torch.Tensor]]]:
        """(start, stop, pieces) for every range, releasing each range once the caller moves on."""
        for start, stop in self.ranges():
            yield start, stop, self.read(tensors, start, stop)
            self.release(start, stop)
