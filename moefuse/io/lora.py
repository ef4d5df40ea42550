"""LoRA adapters (PEFT's format) applied to a checkpoint as it is read: mergekit's `MODEL+ADAPTER`.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. Each weight W it
targets is read as W + s * B @ A (an embedding: W + s * (B @ A)^T, from PEFT's
`lora_embedding_A/B`), with s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, r and
lora_alpha taken per module from `rank_pattern` / `alpha_pattern` where they match. The product is
computed in fp32 and added to W in fp32, then rounded to W's dtype (an embedding's update is rounded
to W's dtype before the addition): what PEFT's `merge_and_unload` gives on the CPU, bit for bit.
Tensors the adapter saves whole (`modules_to_save`, a targeted embedding's base layer, biases)
replace the model's. In a model with tied embeddings that stores no LM head, the head's tensors
act on the embedding it shares: its update is added after the embedding's own, as PEFT merges
them. Only the targeted tensors are copied into memory, one at a time; the others stay
memory-mapped views.

Refused, naming the file and what to do: adapters of another PEFT type or with DoRA, LoRA biases,
fan_in_fan_out, layer replication, trainable tokens or target parameters; pickled adapter weights;
adapter tensors that match no weight of the model, or whose shapes do not fit it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open

from moefuse.io.local_files import read_json_object
from moefuse.io.safetensors_reader import CheckpointError, CheckpointReader

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json settings that change what merging means, and are not supported
UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "layer_replication", "trainable_token_indices",
               "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora")
PAIRS = {".lora_A.weight": ("A", "linear"), ".lora_B.weight": ("B", "linear"),
         ".lora_embedding_A": ("A", "embedding"), ".lora_embedding_B": ("B", "embedding")}


@dataclass
class LowRankUpdate:
    """The update s * B @ A (transposed for an embedding) of one weight."""

    a_key: str
    b_key: str
    scale: float
    embedding: bool


def _pattern_value(patterns: Dict[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter folder, checked against the checkpoint it is applied to."""

    def __init__(self, folder: os.PathLike, model: CheckpointReader):
        self.folder = Path(folder)
        self._config()
        weights = self.folder / WEIGHTS_NAME
        if not weights.is_file():
            pickled = [p.name for p in self.folder.glob("adapter_model.*")]
            hint = (f"; it holds {', '.join(pickled)}, which moefuse never unpickles: re-save the adapter with "
                    "safetensors (PEFT's save_pretrained does by default)") if pickled else ""
            raise CheckpointError(f"LoRA adapter {self.folder} has no {WEIGHTS_NAME}{hint}")
        self._file = safe_open(str(weights), framework="pt")
        self.updates: Dict[str, List[LowRankUpdate]] = {}  # model key -> its updates, in PEFT's order
        self.replacements: Dict[str, str] = {}  # model key -> adapter key of a whole saved tensor
        halves: Dict[str, Dict[str, str]] = {}
        for key in self._file.keys():
            module, part, kind = self._split(key)
            if part is None:
                self._add_replacement(key, model, module.replace(".base_layer", ""))
            else:
                halves.setdefault(module, {"kind": kind})[part] = key
        for module, pair in halves.items():
            if "A" not in pair or "B" not in pair:
                raise CheckpointError(f"LoRA adapter {weights}: module '{module}' has only one of its A and B matrices")
            target = self._model_key(pair["A"], model, module + ".weight")
            self.updates.setdefault(target, []).append(self._update(module, pair, model.info(target).shape))
        for updates in self.updates.values():  # a tied head's update after the embedding's own, as PEFT merges
            updates.sort(key=lambda update: not update.embedding)

    def _add_replacement(self, adapter_key: str, model: CheckpointReader, key: str) -> None:
        """Record the whole tensor `adapter_key` as the new value of the model's `key` (checked to
        fit it; for a tied head, the embedding's own saved tensor takes precedence)."""
        target = self._model_key(adapter_key, model, key)
        saved, expected = tuple(self._file.get_slice(adapter_key).get_shape()), model.info(target).shape
        if saved != tuple(expected):
            raise CheckpointError(f"LoRA adapter {self.folder}: '{adapter_key}' has shape {list(saved)} where the "
                                  f"model's '{target}' has {list(expected)} (an adapter trained with a resized "
                                  "vocabulary?); merge it into its model with PEFT first")
        if target == key or target not in self.replacements:
            self.replacements[target] = adapter_key

    def _config(self) -> None:
        path = self.folder / CONFIG_NAME
        if not path.is_file():
            state = "does not exist" if not self.folder.exists() else f"has no {CONFIG_NAME}"
            raise CheckpointError(f"LoRA adapter folder {self.folder} {state}; give MODEL+ADAPTER with a PEFT "
                                  "LoRA adapter folder")
        config = read_json_object(path)
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path}: only LoRA adapters can be merged, this one is {config['peft_type']}; "
                                  "merge it into its model with PEFT's merge_and_unload first")
        used = [name for name in UNSUPPORTED if config.get(name)]
        if used:
            raise CheckpointError(f"{path} uses {', '.join(used)}, which moefuse does not apply; merge the adapter "
                                  "into its model with PEFT's merge_and_unload and merge that folder instead")
        self.rank, self.alpha = config.get("r", 8), config.get("lora_alpha", 8)
        self.rslora = bool(config.get("use_rslora"))
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}

    @staticmethod
    def _split(key: str):
        """(module name, 'A'/'B' or None for a whole tensor, kind) of an adapter key."""
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, (part, kind) in PAIRS.items():
            if name.endswith(suffix):
                return name[:-len(suffix)], part, kind
        return name, None, None

    def _model_key(self, adapter_key: str, model: CheckpointReader, key: str) -> str:
        """The model key an adapter tensor for `key` changes: `key`, or for a tied LM head, the
        embedding it shares (PEFT then merges the head's update into that weight too)."""
        stored = model.stored_key(key)
        if stored is None:
            raise CheckpointError(f"LoRA adapter {self.folder}: tensor '{adapter_key}' targets '{key}', which "
                                  f"{model.folder} does not have; was the adapter trained on another model?")
        return stored

    def _update(self, module: str, pair: Dict[str, str], shape) -> LowRankUpdate:
        """The update of `module`'s weight (of `shape`), its A and B checked to fit it."""
        a_shape, b_shape = self._file.get_slice(pair["A"]).get_shape(), self._file.get_slice(pair["B"]).get_shape()
        embedding = pair["kind"] == "embedding"
        rows, columns = (shape[1], shape[0]) if embedding else (shape[0], shape[1]) if len(shape) == 2 else (0, 0)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or (b_shape[0], a_shape[1]) != (rows, columns):
            raise CheckpointError(f"LoRA adapter {self.folder}: module '{module}' has A {list(a_shape)} and B "
                                  f"{list(b_shape)}, which do not fit its weight {list(shape)}")
        rank = _pattern_value(self.rank_pattern, module, self.rank)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        scale = alpha / math.sqrt(rank) if self.rslora else alpha / rank
        return LowRankUpdate(pair["A"], pair["B"], scale, embedding)

    def targets(self, key: str) -> bool:
        return key in self.updates or key in self.replacements

    def apply(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """Tensor `key` with the adapter applied (a new tensor; `weight` is the model's): the
        saved tensor if the adapter has one (a targeted embedding saves its base layer too), plus
        each low-rank update in turn."""
        if key in self.replacements:
            weight = self._file.get_tensor(self.replacements[key]).to(weight.dtype)
        for update in self.updates.get(key, ()):
            product = self._file.get_tensor(update.b_key).float() @ self._file.get_tensor(update.a_key).float()
            if update.embedding:  # PEFT rounds an embedding's update to the weight's dtype before adding it
                weight = weight + (product.T * update.scale).to(weight.dtype)
            else:
                weight = (weight.float() + product * update.scale).to(weight.dtype)
        return weight

    def close(self) -> None:
        self._file = None


class AdaptedCheckpointReader(CheckpointReader):
    """A checkpoint read with a LoRA adapter applied to the tensors it targets."""

    def __init__(self, folder: os.PathLike, adapter: os.PathLike):
        super().__init__(folder)
        self.adapter = LoraAdapter(adapter, self)

    @property
    def adapter_folder(self) -> Optional[Path]:
        return self.adapter.folder

    @property
    def name(self) -> str:
        return f"{self.folder}+{self.adapter.folder}"

    def copied(self, key: str) -> bool:
        return self.adapter.targets(key)

    def tensor(self, key: str) -> torch.Tensor:
        weight = super().tensor(key)
        if not self.adapter.targets(key):
            return weight
        adapted = self.adapter.apply(key, weight)
        self.release([key])  # only the copy is read from here on
        return adapted

    def close(self) -> None:
        self.adapter.close()
        super().close()


def open_checkpoint(folder: os.PathLike, adapter: Optional[os.PathLike] = None) -> CheckpointReader:
    """A reader of the checkpoint `folder`, with the LoRA `adapter` folder applied if given."""
    return CheckpointReader(folder) if adapter is None else AdaptedCheckpointReader(folder, adapter)
