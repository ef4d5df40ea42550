"""Atomic output folders and the non-weight files of a Hugging Face checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

import torch

from moefuse.errors import MoefuseError

PARTIAL_MARKER = ".moefuse-partial-"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class OutputExistsError(MoefuseError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class OutputIsInputError(MoefuseError, ValueError):
    """The output folder is one of the inputs, or holds one: writing it would replace an input."""


def check_output_is_not_an_input(out_dir: os.PathLike, inputs: Iterable[os.PathLike]) -> None:
    """Refuse an `out_dir` that is one of `inputs` or a folder above one (symbolic links resolved):
    with --overwrite, the finished output would replace it and so delete the input."""
    out = Path(out_dir).resolve()
    for folder in inputs:
        resolved = Path(folder).resolve()
        if resolved == out or out in resolved.parents:
            held = "is" if resolved == out else "holds"
            raise OutputIsInputError(f"output folder {out_dir} {held} the input {folder}; writing it would replace "
                                     f"that input. Choose another output folder")


def check_output_dir(out_dir: os.PathLike, overwrite: bool, inputs: Iterable[os.PathLike] = ()) -> None:
    """Refuse `out_dir` if it is or holds one of `inputs`, or exists without `overwrite` (the
    checks `atomic_output_dir` makes; call it early too, before work that takes long)."""
    check_output_is_not_an_input(out_dir, inputs)
    if Path(out_dir).exists() and not overwrite:
        raise OutputExistsError(f"output folder {out_dir} already exists; choose another or pass --overwrite "
                                "(overwrite=True)")


def _umask() -> int:
    """The process's file mode creation mask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(out_dir: os.PathLike, overwrite: bool = False, inputs: Iterable[os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out_dir`; on success it is renamed to `out_dir`
    (replacing an old one only if `overwrite`), on failure it is deleted. A process killed
    midway leaves only a hidden `.NAME.moefuse-partial-*` folder, never one named `out_dir`.
    An `out_dir` that is or holds one of the `inputs` folders is refused. The folder gets the
    permissions `mkdir` would give it (0777 less the umask), not the temporary folder's 0700."""
    out = Path(out_dir)
    check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARKER}", dir=out.parent))
    try:
        partial.chmod(0o777 & ~_umask())
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.moefuse-old-", dir=out.parent))
        out.rename(retired / out.name)
        partial.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        partial.rename(out)


def copy_model_files(config_source: Path, dest: Path, dtype: Optional[torch.dtype],
                     updates: Optional[Dict[str, Any]] = None) -> None:
    """Copy config.json (with the output dtype and `updates` applied) and generation_config.json
    from `config_source`."""
    config_path = Path(config_source) / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config.update(updates or {})
        if dtype in DTYPE_CONFIG_NAMES:
            config["dtype"] = DTYPE_CONFIG_NAMES[dtype]
            if "torch_dtype" in config:  # the older name, still read by older transformers
                config["torch_dtype"] = config["dtype"]
        (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_generation_config(config_source, dest)


def copy_generation_config(source: Path, dest: Path) -> None:
    """Copy generation_config.json from `source` into `dest`, if `source` has one."""
    generation = Path(source) / "generation_config.json"
    if generation.exists():
        shutil.copyfile(generation, dest / generation.name)


def copy_tokenizer_files(source: Path, dest: Path) -> None:
    """Copy the tokenizer files (TOKENIZER_FILES) that `source` has into `dest`."""
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.exists():
            shutil.copyfile(path, dest / name)
