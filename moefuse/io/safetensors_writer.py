"""Write a safetensors checkpoint in shards whose layout is planned before any data exists.

Every output tensor's key, shape and dtype is known before merging, so each shard's header is
written first and tensors are appended as they are produced: no shard is ever held in memory.
Shards follow transformers' names (`model.safetensors`, or `model-0000i-of-0000N.safetensors`
with `model.safetensors.index.json`). Shards are written past the page cache where the file
system allows it (`moefuse.io.direct_file`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from moefuse.errors import MoefuseError
from moefuse.io.direct_file import SequentialFile
from moefuse.io.safetensors_reader import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """'5GB' -> 5 * 10**9 (decimal units as transformers; KiB/MiB/GiB binary); ints pass through."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match or match.group(2) not in _UNITS:
        raise MoefuseError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class OutputTensor:
    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


@dataclass
class _Shard:
    name: str
    tensors: List[OutputTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[OutputTensor], max_shard_size: int) -> List[_Shard]:
    """Greedy, in output order: start a new shard when the next tensor would overflow."""
    shards: List[_Shard] = []
    for tensor in tensors:
        if not shards or (shards[-1].tensors and shards[-1].nbytes + tensor.nbytes > max_shard_size):
            shards.append(_Shard(""))
        shards[-1].tensors.append(tensor)
    if len(shards) == 1:
        shards[0].name = SINGLE_NAME
    for i, shard in enumerate(shards):
        if len(shards) > 1:
            shard.name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def _header(shard: _Shard, metadata: Dict[str, str]) -> bytes:
    entries: Dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in shard.tensors:
        entries[tensor.key] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned
    return len(text).to_bytes(8, "little") + text


class ShardedWriter:
    """Writes `tensors` (in this order, through `write`) into `folder`; `direct_io=False` writes
    through the page cache."""

    def __init__(self, folder: Path, tensors: Sequence[OutputTensor], max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                 metadata: Optional[Dict[str, str]] = None, direct_io: bool = True):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, parse_size(max_shard_size))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(shard_index, t) for shard_index, s in enumerate(self.shards) for t in s.tensors]
        self._next = 0
        self.direct_io = direct_io
        self._handle: Optional[SequentialFile] = None
        self._open_shard = -1
        self._written = 0  # bytes of the current tensor

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor whole."""
        expected = self._order[self._next][1]
        if tuple(tensor.shape) != expected.shape:
            raise MoefuseError(
                f"internal error: tensor '{key}' should have shape {list(expected.shape)}, got {list(tensor.shape)}"
            )
        self.begin(key)
        self.append(tensor)
        self.end()

    def begin(self, key: str) -> None:
        """Start the next planned tensor, to be written in flat pieces with `append`."""
        shard_index, expected = self._order[self._next]
        if key != expected.key:
            raise MoefuseError(f"internal error: expected tensor '{expected.key}' next, got '{key}'")
        if shard_index != self._open_shard:
            self._close_handle()
            shard = self.shards[shard_index]
            self._handle = SequentialFile(self.folder / shard.name, self.direct_io)
            self._handle.write(_header(shard, self.metadata))
            self._open_shard = shard_index
        self._written = 0

    def append(self, piece: torch.Tensor) -> None:
        """Write the next entries of the current tensor (in flat order)."""
        expected = self._order[self._next][1]
        if piece.dtype != expected.dtype or self._written + piece.numel() * piece.element_size() > expected.nbytes:
            raise MoefuseError(
                f"internal error: a {piece.dtype} piece of {piece.numel()} entries does not fit tensor "
                f"'{expected.key}' ({expected.dtype}, {self._written} of {expected.nbytes} bytes written)"
            )
        data = piece.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._written += data.numel() * data.element_size()

    def end(self) -> None:
        """Finish the current tensor, checking that all its bytes were written."""
        expected = self._order[self._next][1]
        if self._written != expected.nbytes:
            raise MoefuseError(
                f"internal error: tensor '{expected.key}' got {self._written} of its {expected.nbytes} bytes"
            )
        self._next += 1

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> None:
        """Close the last shard and write the index (sharded outputs only)."""
        if self._next != len(self._order):
            raise MoefuseError(f"internal error: {len(self._order) - self._next} planned tensors were not written")
        self._close_handle()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.key: s.name for s in self.shards for t in s.tensors},
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.abort()
            self._handle = None
