"""Read Hugging Face safetensors checkpoints by memory map, one tensor at a time.

Tensors are zero-copy views of private (copy-on-write) file mappings: reading one touches only
its pages, `prefetch` asks the kernel to read ahead, and `release` drops a tensor's pages from
this process again, so resident memory follows the tensors in use, not the model size.
Pickled checkpoints (`*.bin`, `*.pt`) are refused: moefuse never unpickles files.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from moefuse.errors import MoefuseError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
HEADER_LIMIT = 100 * 1024 * 1024
PAGE = mmap.PAGESIZE

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


class CheckpointError(MoefuseError, ValueError):
    """A checkpoint folder or file is missing, pickled, corrupt or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def pickle_refusal(folder: Path, found: List[Path]) -> CheckpointError:
    names = ", ".join(p.name for p in found[:3])
    return CheckpointError(
        f"{folder} holds only pickled PyTorch weights ({names}); moefuse never unpickles files. "
        "Convert the checkpoint to safetensors first, e.g. "
        f"python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\" "
        "(only for checkpoints you trust)"
    )


def read_header(path: Path) -> Dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header (8-byte length, JSON, data)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes): re-download or re-save it")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(HEADER_LIMIT, size - 8):
            raise CheckpointError(
                f"{path} is corrupt or truncated: its header claims {length} bytes but the file has {size}"
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({error}); re-download or re-save it") from None
    data_start = 8 + length
    infos: Dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{key}' has a malformed header entry {entry!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor '{key}' of shape {list(shape)} and dtype {entry['dtype']} should take "
                f"{expected} bytes, the header gives {end - begin}: the file is corrupt"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor '{key}' ends at byte {data_start + end} of {size}; "
                "re-download or re-save it"
            )
        infos[key] = TensorInfo(key, path, dtype, shape, data_start + begin, data_start + end)
    return infos


class CheckpointReader:
    """A Hugging Face model folder with safetensors weights (single file or sharded)."""

    def __init__(self, folder: os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"model folder {self.folder} does not exist or is not a folder; check the path")
        self.tensors: Dict[str, TensorInfo] = {}
        for path in self._weight_files():
            for key, info in read_header(path).items():
                if key in self.tensors:
                    raise CheckpointError(f"{self.folder}: tensor '{key}' appears in two weight files")
                self.tensors[key] = info
        self._maps: Dict[Path, mmap.mmap] = {}

    def _weight_files(self) -> List[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index ({error})") from None
            files = sorted({self.folder / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} lists missing shard(s) {', '.join(missing)}; the download is incomplete")
            return files
        if (self.folder / SINGLE_NAME).exists():
            return [self.folder / SINGLE_NAME]
        files = sorted(self.folder.glob("*.safetensors"))
        if len(files) == 1:
            return files
        if len(files) > 1:
            raise CheckpointError(f"{self.folder} has several .safetensors files but no {INDEX_NAME}")
        pickled = [p for pattern in PICKLE_PATTERNS for p in sorted(self.folder.glob(pattern))]
        if pickled:
            raise pickle_refusal(self.folder, pickled)
        raise CheckpointError(f"{self.folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})")

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path} is not valid JSON ({error})") from None

    def keys(self) -> List[str]:
        return list(self.tensors)

    @property
    def adapter_folder(self) -> Optional[Path]:
        """The LoRA adapter applied to the tensors read (see moefuse.io.lora), if any."""
        return None

    @property
    def name(self) -> str:
        """How the checkpoint is named to the user: its folder (MODEL+ADAPTER with an adapter)."""
        return str(self.folder)

    def stored_key(self, key: str) -> Optional[str]:
        """The key tensor `key` is stored under: itself, or for the LM head of a model with tied
        embeddings that stores none, the embedding (as transformers loads it); None if absent."""
        if key in self.tensors:
            return key
        if key == TIED_HEAD and TIED_EMBEDDING in self.tensors and self.config().get("tie_word_embeddings", True):
            return TIED_EMBEDDING
        return None

    def copied(self, key: str) -> bool:
        """True when `tensor(key)` returns a copy in memory, not a view of the file (see moefuse.io.lora)."""
        return False

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as handle:
                self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[path]

    def tensor(self, key: str) -> torch.Tensor:
        """A zero-copy view of tensor `key` (writes stay private to this process)."""
        info = self.tensors[key]
        numel = info.nbytes // max(1, info.dtype.itemsize)
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unaligned-buffer notices are harmless here
            flat = torch.frombuffer(self._map(info.file), dtype=info.dtype, count=numel, offset=info.start)
        return flat.reshape(info.shape)

    def _advise(self, info: TensorInfo, start: int, stop: int, advice: int) -> None:
        """madvise the file bytes [start, stop) (widened to whole pages)."""
        start -= start % PAGE
        if stop > start:
            self._map(info.file).madvise(advice, start, stop - start)

    def prefetch(self, keys: Iterable[str]) -> None:
        """Ask the kernel to read these tensors ahead (asynchronous, costs no resident memory)."""
        for key in keys:
            info = self.tensors[key]
            self._advise(info, info.start, info.stop, mmap.MADV_WILLNEED)

    def release(self, keys: Iterable[str]) -> None:
        """Drop these tensors' pages from this process (they are re-read if used again)."""
        for key in keys:
            self.release_entries(key, 0, None)

    def release_entries(self, key: str, start: int, stop) -> None:
        """Drop the pages of flat entries [start, stop) of tensor `key` (stop None: to the end)."""
        info = self.tensors[key]
        size = info.dtype.itemsize
        end = info.stop if stop is None else min(info.stop, info.start + stop * size)
        self._advise(info, info.start + start * size, end, mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Let go of the file mappings. A mapping is unmapped when the last tensor viewing it is
        freed: torch.frombuffer holds the mmap object but not a buffer export, so closing it here
        would unmap memory that a live view (say, one held by an exception's traceback) still reads."""
        self._maps.clear()
