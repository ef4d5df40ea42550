"""Execute a merge plan: stream tensors from memory-mapped inputs, merge, write shards.

While tensor i is merged, a worker thread prepares tensor i + 1: it asks the kernel to read its
pages ahead (madvise WILLNEED, which costs no resident memory until the pages are used) and, on
CUDA, stages it through pinned host memory onto the GPU on a side stream. Once tensor i is
merged its input pages are dropped, and a writer thread writes it while tensor i + 1 is merged.
Resident memory therefore stays near (models + 3) x the largest tensor (inputs, the output being
computed and the one being written), whatever the model size.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from tqdm import tqdm

from moefuse.errors import MoefuseError
from moefuse.io.output import atomic_output_dir, copy_model_files
from moefuse.io.safetensors_writer import DEFAULT_MAX_SHARD_SIZE, ShardedWriter
from moefuse.merge.config import MergeConfig, parse_config
from moefuse.merge.plan import MergePlan, TensorTask, align_plan, build_plan, describe
from moefuse.ops.merge import merge_tensors


class _Loader:
    """Produces a task's input tensors on the target device, one task ahead."""

    def __init__(self, device: torch.device, compute_dtype: Optional[torch.dtype]):
        self.device = device
        self.compute_dtype = compute_dtype
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _load(self, task: TensorTask) -> List[torch.Tensor]:
        for source in task.sources:
            source.reader.prefetch([source.key])
        tensors = [source.read() for source in task.sources]
        if task.merge and self.compute_dtype is not None:
            tensors = [t.to(self.compute_dtype) for t in tensors]
        if self._stream is None:
            return tensors
        with torch.cuda.stream(self._stream):
            staged = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        self._stream.synchronize()
        return staged

    def start(self, task: TensorTask) -> Future:
        return self._pool.submit(self._load, task)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _release(task: TensorTask) -> None:
    """Drop the task's input pages from this process."""
    for source in task.sources:
        source.reader.release([source.key])


def _merge_task(plan: MergePlan, task: TensorTask, tensors: List[torch.Tensor], backend: str) -> torch.Tensor:
    if not task.merge:
        return tensors[0]
    base = tensors[0] if task.base is not None else None
    inputs = tensors[1:] if task.base is not None else tensors
    try:
        return merge_tensors(base, inputs, plan.config.merge_method, out_dtype=task.out_dtype, backend=backend, **task.params)
    except MoefuseError as error:
        raise type(error)(f"tensor '{task.key}': {error}") from None


def execute(plan: MergePlan, out_dir: Path, *, device: str = "cpu", backend: str = "auto",
            max_shard_size=DEFAULT_MAX_SHARD_SIZE, progress: bool = True, overwrite: bool = False) -> Path:
    """Run `plan`, writing a Hugging Face checkpoint folder at `out_dir` atomically."""
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise MoefuseError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    config_source = plan.base.folder if plan.base is not None else plan.models[0].folder
    tokenizer_source = plan.config.tokenizer_source or config_source
    if not Path(tokenizer_source).is_dir():
        raise MoefuseError(f"tokenizer_source {tokenizer_source} is not a folder")
    out_dtypes = {t.out_dtype for t in plan.tasks if t.merge}
    loader = _Loader(target, plan.compute_dtype)
    write_pool = ThreadPoolExecutor(max_workers=1)  # writes overlap the next tensor's merge
    bar = tqdm(total=plan.output_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress)
    started = time.perf_counter()
    writing: Optional[Tuple[Future, TensorTask]] = None

    def finish_write(done: int) -> None:
        future, task = writing
        future.result()
        if not task.merge:  # a copied tensor is written straight from its input pages
            _release(task)
        bar.update(task.output.nbytes)
        bar.set_postfix(tensors_per_s=f"{done / (time.perf_counter() - started):.1f}")

    try:
        align_plan(plan)
        with atomic_output_dir(out_dir, overwrite) as partial:
            writer = ShardedWriter(partial, [t.output for t in plan.tasks], max_shard_size,
                                   metadata={"producer": "moefuse"})
            pending = loader.start(plan.tasks[0])
            try:
                for index, task in enumerate(plan.tasks):
                    tensors = pending.result()
                    if index + 1 < len(plan.tasks):
                        pending = loader.start(plan.tasks[index + 1])
                    merged = _merge_task(plan, task, tensors, backend).to(task.out_dtype)
                    del tensors
                    if task.merge:
                        _release(task)
                    if writing is not None:
                        finish_write(index)
                    writing = (write_pool.submit(writer.write, task.key, merged), task)
                    del merged
                finish_write(len(plan.tasks))
            except BaseException:
                wait([writing[0]] if writing else [])  # let the folder be removed with no write in flight
                writer.abort()
                raise
            writer.finish()
            copy_model_files(config_source, Path(tokenizer_source), partial,
                             out_dtypes.pop() if len(out_dtypes) == 1 else None)
    finally:
        bar.close()
        write_pool.shutdown(wait=True)
        loader.close()
        plan.close()
    return Path(out_dir)


def merge_checkpoints(config: Union[str, os.PathLike, Dict, MergeConfig], out_dir: Union[str, os.PathLike], *,
                      device: str = "cpu", backend: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                      progress: bool = True, overwrite: bool = False, dry_run: bool = False) -> Union[Path, str]:
    """Merge the checkpoints described by `config` (a mergekit-style YAML path, a dict or a
    `MergeConfig`) into a Hugging Face checkpoint folder `out_dir`.

    With `dry_run`, nothing is read beyond headers or written; the plan's description is returned.
    """
    parsed = config if isinstance(config, MergeConfig) else parse_config(config)
    plan = build_plan(parsed)
    if dry_run:
        text = describe(plan)
        plan.close()
        return text
    return execute(plan, Path(out_dir), device=device, backend=backend, max_shard_size=max_shard_size,
                   progress=progress, overwrite=overwrite)
