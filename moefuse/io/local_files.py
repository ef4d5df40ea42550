"""Checks on the local files a command is pointed at (model folders, text files), made before
transformers sees them: transformers would try the model hub for a missing folder, unpickle `.bin`
weights, and explain a missing tokenizer as a missing package."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Union

from moefuse.io.output import TOKENIZER_FILES
from moefuse.io.safetensors_reader import CheckpointError, CheckpointReader

PathLike = Union[str, os.PathLike]


def read_model_config(folder: PathLike) -> Dict[str, Any]:
    """The config.json of the local checkpoint folder `folder`, as a dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist or is not a folder; check the path "
                              "(moefuse never downloads models)")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder")
    return read_json_object(path)


def read_json_object(path: PathLike) -> Dict[str, Any]:
    """The JSON object in the existing file `path` (a model's config, a tokenizer's settings)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); repair or re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def checked_model_folder(folder: PathLike, *, tokenizer: bool = True) -> Dict[str, Any]:
    """Check that `folder` is a local checkpoint transformers can load without the hub and without
    unpickling: a config.json, safetensors weights whose headers read cleanly (pickled-only folders
    are refused), and, with `tokenizer`, tokenizer files. Returns its config.json as a dict."""
    config = read_model_config(folder)
    CheckpointReader(folder).close()
    if tokenizer:
        check_tokenizer_files(folder)
    return config


def has_tokenizer_files(folder: PathLike) -> bool:
    """True if `folder` holds any tokenizer file (TOKENIZER_FILES)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer_files(folder: PathLike) -> None:
    """Refuse a `folder` without any tokenizer file (TOKENIZER_FILES)."""
    if not has_tokenizer_files(folder):
        raise CheckpointError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                              "tokenizer files of the model it came from into it")


def read_text_file(path: PathLike, what: str) -> str:
    """The UTF-8 text of the local file `path`, described as `what` in errors."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{what} {path} {state}; pass a local UTF-8 text file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{what} {path} is not UTF-8 text (byte {error.start} is 0x{data[error.start]:02x}); "
                              "convert it, e.g. iconv -f latin1 -t utf-8") from None
