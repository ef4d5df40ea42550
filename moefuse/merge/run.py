"""Execute a merge plan: stream tensors from memory-mapped inputs, merge, write shards.

On the CPU each merged tensor streams in flat pieces of PIECE_ENTRIES entries: every pass reads
one piece of each input from the memory map and then drops its pages, and each output piece is
written (on a writer thread, while the next pieces are merged) as soon as it is produced.
Resident memory therefore stays near (models + 1 + WRITES_IN_FLIGHT) pieces plus a fixed
overhead, whatever the tensor or model size. Meanwhile a worker thread asks the kernel to read
the next tensor ahead (madvise WILLNEED, which costs no resident memory).

With --device cuda each tensor is merged whole on the GPU: the worker thread stages the next
tensor through pinned host memory onto the GPU on a side stream while the current one is merged.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from tqdm import tqdm

from moefuse.device import resolve_device
from moefuse.errors import MoefuseError, NonfiniteInputError
from moefuse.io.output import (
    atomic_output_dir,
    check_output_dir,
    check_output_is_not_an_input,
    copy_model_files,
    copy_tokenizer_files,
)
from moefuse.io.safetensors_writer import DEFAULT_MAX_SHARD_SIZE, ShardedWriter
from moefuse.merge.chat_template import resolve_chat_template, write_chat_template
from moefuse.merge.config import MergeConfig, parse_config
from moefuse.merge.plan import MergePlan, TensorTask, align_plan, build_plan, describe, nonfinite_input
from moefuse.ops.merge import merge_streamed, merge_tensors

PIECE_ENTRIES = 1 << 21  # 4 MB of bf16 per input and pass
# Output pieces queued for the writer thread. One was too few: a direct write waits for the
# device, and the merge then waited for the writer (0.8 s of a 6.4 s merge on the benchmark).
WRITES_IN_FLIGHT = 3
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _return_freed_pieces_to_the_system() -> None:
    """Pin glibc's mmap threshold at 1 MiB. By default glibc raises it after the first large free,
    so the output pieces (a few MB each) would then come from the heap, whose freed top is kept:
    resident memory would grow by tens of MB of garbage. No effect on other C libraries."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


class _Loader:
    """Produces a task's input tensors one task ahead: memory-map views on the CPU (read ahead by
    the kernel), or copies on the GPU in the task's compute dtype."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _load(self, task: TensorTask) -> List[torch.Tensor]:
        for source in task.sources:
            source.reader.prefetch([source.key])
        tensors = [source.read() for source in task.sources]
        if self._stream is None:
            return tensors
        if task.merge and task.compute_dtype is not None:  # inputs of mixed dtypes then share one
            tensors = [t.to(task.compute_dtype) for t in tensors]
        with torch.cuda.stream(self._stream):
            staged = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        self._stream.synchronize()
        _release_all(task)
        return staged

    def start(self, task: TensorTask) -> Future:
        return self._pool.submit(self._load, task)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _PiecePool:
    """Buffers of PIECE_ENTRIES entries for the merged pieces, lent to the merge and given back
    once written, so that the same few are reused: the fused pass writing into a fresh buffer
    would pay a page fault per 4 KiB (on a VM that hands freed memory back to its host, a host
    fault too). As many are alive as pieces are in flight."""

    def __init__(self):
        self._free: Dict[torch.dtype, List[torch.Tensor]] = {}
        self._lent: Dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, entries: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of `entries` entries: a free one where there is one (a piece larger than
        PIECE_ENTRIES gets a new buffer of its own, which is not kept)."""
        if entries > PIECE_ENTRIES:
            return torch.empty(entries, dtype=dtype)
        with self._lock:
            free = self._free.get(dtype)
            buffer = free.pop() if free else torch.empty(PIECE_ENTRIES, dtype=dtype)
            self._lent[buffer.data_ptr()] = buffer
        return buffer[:entries]

    def give_back(self, piece: torch.Tensor) -> None:
        """Reuse the buffer of a written piece (a piece from elsewhere is left alone)."""
        with self._lock:
            buffer = self._lent.pop(piece.data_ptr(), None)
            if buffer is not None:
                self._free.setdefault(buffer.dtype, []).append(buffer)


class _Output:
    """Writes tensors piece by piece on one thread, in order, with at most WRITES_IN_FLIGHT
    writes queued, and advances the progress bar by the bytes written; the buffers of written
    pieces go back to `pool`."""

    def __init__(self, writer: ShardedWriter, bar: tqdm):
        self.writer = writer
        self.bar = bar
        self.pool = _PiecePool()
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: "deque[Future]" = deque()
        self._started = time.perf_counter()
        self._tensors = 0

    def _submit(self, call, *args) -> None:
        while len(self._pending) >= WRITES_IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(call, *args))

    def begin(self, key: str) -> None:
        self._submit(self.writer.begin, key)

    def append(self, piece: torch.Tensor) -> None:
        def write():
            self.writer.append(piece)
            self.pool.give_back(piece)
            self.bar.update(piece.numel() * piece.element_size())
        self._submit(write)

    def end(self, after=None) -> None:
        def finish():
            self.writer.end()
            if after is not None:
                after()
            self._tensors += 1
            self.bar.set_postfix(tensors_per_s=f"{self._tensors / (time.perf_counter() - self._started):.1f}")
        self._submit(finish)

    def flush(self) -> None:
        """Wait for the writes in flight (re-raising the first error)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the last write; after a failure elsewhere its own error is not raised."""
        try:
            self.flush()
        except Exception:
            if raise_errors:
                raise
        finally:
            self._pool.shutdown(wait=True)


def _release_all(task: TensorTask) -> None:
    for source in task.sources:
        source.release()


def _merge_task(plan: MergePlan, task: TensorTask, tensors: List[torch.Tensor], backend: str, output: _Output,
                allow_nonfinite: bool) -> None:
    """Merge one tensor into `output`: streamed on the CPU, whole on the GPU."""
    base = tensors[0] if task.base is not None else None
    inputs = tensors[1:] if task.base is not None else tensors
    method = plan.config.merge_method
    try:
        if tensors[0].device.type == "cpu":
            def release(start: int, stop: int) -> None:
                for source in task.sources:
                    source.release(start, stop)

            merge_streamed(base, inputs, method, output.append, piece_size=PIECE_ENTRIES, release=release,
                           compute_dtype=task.compute_dtype, allocate=output.pool.take, out_dtype=task.out_dtype,
                           backend=backend, allow_nonfinite=allow_nonfinite, **task.params)
        else:
            output.append(merge_tensors(base, inputs, method, out_dtype=task.out_dtype, backend=backend,
                                        allow_nonfinite=allow_nonfinite, **task.params).reshape(-1))
    except NonfiniteInputError as error:
        raise nonfinite_input(error, task.key, task.base, task.inputs,
                              ", or pass --allow-nonfinite (allow_nonfinite=True) to merge them as they are") from None
    except MoefuseError as error:
        raise type(error)(f"tensor '{task.key}': {error}") from None


def _tokenizer_source(plan: MergePlan) -> Optional[Path]:
    """The folder whose tokenizer files the output gets: the aligned vocabulary's source (None: it
    is a new tokenizer, saved), else the config source (the base, or the first model)."""
    return plan.vocabulary.copy_from if plan.vocabulary is not None else plan.config_source


def _input_folders(plan: MergePlan) -> List[Path]:
    """Every folder the merge reads: the models, the base, their LoRA adapters and the tokenizer source."""
    tokenizer_source = _tokenizer_source(plan)
    adapters = [reader.adapter_folder for reader in plan.readers if reader.adapter_folder is not None]
    return plan.folders + adapters + ([tokenizer_source] if tokenizer_source is not None else [])


def _write_tokenizer(plan: MergePlan, tokenizer_source: Optional[Path], dest: Path) -> None:
    """The output's tokenizer: `tokenizer_source`'s files, or the new one the aligned vocabulary
    built; then the configured chat template."""
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, dest)
    else:
        plan.vocabulary.save(dest)
    if plan.config.chat_template is None:
        return
    if not any((dest / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        warnings.warn(f"chat_template is not written: the output has no tokenizer, as {tokenizer_source} has none "
                      "(as mergekit, which also skips it); copy a tokenizer into the output and set the template there",
                      stacklevel=3)
        return
    template = resolve_chat_template(plan.config.chat_template, plan.folders)
    if template is not None:
        write_chat_template(dest, template)


def execute(plan: MergePlan, out_dir: Path, *, device: str = "cpu", backend: str = "auto",
            max_shard_size=DEFAULT_MAX_SHARD_SIZE, progress: bool = True, overwrite: bool = False,
            direct_io: bool = True, allow_nonfinite: bool = False) -> Path:
    """Run `plan`, writing a Hugging Face checkpoint folder at `out_dir` atomically (past the page
    cache with `direct_io`, where the file system allows it). The caller closes the plan."""
    target = resolve_device(device)
    tokenizer_source = _tokenizer_source(plan)
    inputs = _input_folders(plan)
    check_output_dir(out_dir, overwrite, inputs)  # before the progress bar shows
    out_dtypes = {t.out_dtype for t in plan.tasks if t.merge}
    _return_freed_pieces_to_the_system()
    loader = _Loader(target)
    bar = tqdm(total=plan.output_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress)
    try:
        align_plan(plan)
        with atomic_output_dir(out_dir, overwrite, inputs) as partial:
            writer = ShardedWriter(partial, [t.output for t in plan.tasks], max_shard_size,
                                   metadata={"producer": "moefuse"}, direct_io=direct_io)
            output = _Output(writer, bar)
            try:
                pending = loader.start(plan.tasks[0])
                for index, task in enumerate(plan.tasks):
                    tensors = pending.result()
                    if index + 1 < len(plan.tasks):
                        pending = loader.start(plan.tasks[index + 1])
                    output.begin(task.key)
                    if task.merge:
                        _merge_task(plan, task, tensors, backend, output, allow_nonfinite)
                    else:  # copied as stored, straight from its input pages
                        output.append(tensors[0].reshape(-1))
                    del tensors
                    output.end(after=lambda task=task: _release_all(task))
                output.close()
            except BaseException:
                output.close(raise_errors=False)  # let the folder be removed with no write in flight
                writer.abort()
                raise
            writer.finish()
            copy_model_files(plan.config_source, partial, out_dtypes.pop() if len(out_dtypes) == 1 else None,
                             plan.config_updates)
            _write_tokenizer(plan, tokenizer_source, partial)
    finally:
        bar.close()
        loader.close()
    return Path(out_dir)


def _output_note(plan: MergePlan, out_dir: Path, overwrite: bool) -> str:
    """What a run would do with `out_dir`: refuse it (naming why) or write it."""
    try:
        check_output_is_not_an_input(out_dir, _input_folders(plan))
    except MoefuseError as error:
        return f"\noutput: refused: {error}"
    if out_dir.exists():
        return f"\noutput: {out_dir} exists and would be " + ("replaced" if overwrite else "refused (pass --overwrite)")
    return f"\noutput: {out_dir} (new)"


def merge_checkpoints(config: Union[str, os.PathLike, Dict, MergeConfig], out_dir: Union[str, os.PathLike], *,
                      device: str = "cpu", backend: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                      progress: bool = True, overwrite: bool = False, dry_run: bool = False,
                      direct_io: bool = True, allow_nonfinite: bool = False) -> Union[Path, str]:
    """Merge the checkpoints described by `config` (a mergekit-style YAML path, a dict or a
    `MergeConfig`) into a Hugging Face checkpoint folder `out_dir`.

    With `dry_run`, nothing is read beyond headers or written; the plan's description is returned.
    With `direct_io` (the default) the shards are written past the page cache (O_DIRECT) where the
    file system allows it: a merge never reads its output back, and on large merges cached output
    pages would evict the inputs' pages. `direct_io=False` writes through the page cache.
    A NaN or Inf in a merged input raises `NonfiniteInputError` naming the tensor and the model
    folder, unless `allow_nonfinite` (then they propagate as the method's arithmetic makes them).
    """
    parsed = config if isinstance(config, MergeConfig) else parse_config(config)
    plan = build_plan(parsed)
    try:
        if dry_run:
            return describe(plan, PIECE_ENTRIES, WRITES_IN_FLIGHT) + _output_note(plan, Path(out_dir), overwrite)
        return execute(plan, Path(out_dir), device=device, backend=backend, max_shard_size=max_shard_size,
                       progress=progress, overwrite=overwrite, direct_io=direct_io, allow_nonfinite=allow_nonfinite)
    finally:
        plan.close()
