"""Build a heterogeneous MoE (MergeME) from whole dense causal LMs of different families, widths
and depths that share one tokenizer; the output is moefuse's `moefuse_hetero` model class.

Configuration (YAML path or dict; `moefuse build-moe` dispatches here on `mode: heterogeneous`):
    mode: heterogeneous
    experts: [<folder> | {source_model: <folder>}, ...]    E >= 1 dense causal LMs
    experts_per_token: K (default 1, at most E)
    routing: learned (default) | perplexity                 see `modeling_hetero`
    routing_temperature: T (default 1; perplexity routing)
    projector: linear (default) | mlp
    projector_hidden_size: H (mlp projectors; default D)
    shared_embeddings: average (default) | <expert index i>
    expert_tables: keep each expert's own embedding and head for perplexity scoring (default:
                   true with routing: perplexity, false otherwise)
    dtype: float32 | bfloat16 | float16 (default: expert 0's)
    seed: seeds the router and the mlp projectors' W_up (default 0)

Tensors written, with D = max_e d_e and V = max_e V_e (pad(t) zero-pads t to [V, D]):
    model.embed_tokens.weight = mean_e pad(Emb_e)     (shared_embeddings: i -> pad(Emb_i))
    lm_head.weight            = mean_e pad(Head_e)    (Head_e = Emb_e for tied experts; i -> pad(Head_i))
    model.router.weight       ~ N(0, 0.02^2)          [E, D]
    model.projectors_in.{e}.weight  = [I_{d_e} | 0]   [d_e, D]  (selects the first d_e coordinates)
    model.projectors_out.{e}.weight = [I_{d_e}; 0]    [D, d_e]  (zero-pads back)
    mlp projectors also: up_weight ~ N(0, 0.02^2), down_weight = 0 (so P is still exact)
    model.experts.{e}.<k>     = expert e's `model.<k>` for every k but embed_tokens (its layers and final norm)
    with expert_tables also model.experts.{e}.embed_tokens.weight = Emb_e and expert_heads.{e}.weight = Head_e
So one expert reproduces itself exactly, and with `shared_embeddings: e`, routing one-hot on e
reproduces expert e exactly (the averaged tables of MergeME make that approximate until training).

Expert tensors are read by memory map and written one at a time into pre-planned shards of an
atomically renamed folder; a shared table is summed TABLE_ROWS rows at a time in fp32 into its
output, so the peak holds one output table plus a few input tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from moefuse.io.output import DTYPE_CONFIG_NAMES
from moefuse.io.safetensors_reader import CheckpointReader
from moefuse.io.safetensors_writer import DEFAULT_MAX_SHARD_SIZE, OutputTensor
from moefuse.merge.config import checkpoint_dtype, parse_dtype
from moefuse.merge.plan import Source
from moefuse.moe.build import (
    OutputTask, check_comparable_tokenizers, model_config, run_builder, same_vocabulary, write_tasks,
)
from moefuse.moe.config import (
    MoeConfigError, check_dtype, check_experts_per_token, listed, model_folder, read_config_mapping,
)
from moefuse.moe.configuration_hetero import MODEL_TYPE, PROJECTORS, ROUTING_MODES, MoefuseHeteroConfig

HETERO_KEYS = ("mode", "experts", "experts_per_token", "routing", "routing_temperature", "projector",
               "projector_hidden_size", "shared_embeddings", "expert_tables", "dtype", "seed")
EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
INIT_STD = 0.02
TABLE_ROWS = 4096  # rows of the shared tables summed at once
CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@dataclass(frozen=True)
class HeteroBuildConfig:
    """A heterogeneous MoE configuration (see the module docstring). Every instance is validated on
    construction (`check_hetero_config`), whether `parse_hetero_config` made it or a caller did."""

    experts: List[Path]
    experts_per_token: int = 1
    routing: str = "learned"
    routing_temperature: float = 1.0
    projector: str = "linear"
    projector_hidden_size: Optional[int] = None
    shared_embeddings: Union[str, int] = "average"
    expert_tables: bool = False
    dtype: Optional[torch.dtype] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_hetero_config(self)


def _check_integer(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoeConfigError(f"config: {key} must be an integer >= {minimum}, got {value!r}")


def _check_choice(value: Any, key: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise MoeConfigError(f"config: {key} {value!r} is not supported; use one of {', '.join(choices)}")


def check_hetero_config(cfg: HeteroBuildConfig) -> None:
    """Refuse an invalid configuration, naming the option: every check of a heterogeneous MoE
    config that needs no model files (those are made by `HeteroMoeBuilder`)."""
    if not isinstance(cfg.experts, list):
        raise MoeConfigError(f"config: experts must be a list of model folders, got {cfg.experts!r}")
    for index, folder in enumerate(cfg.experts):
        model_folder(folder, f"experts[{index}]")
    if not cfg.experts:
        raise MoeConfigError("config: 'experts' must list at least one dense causal LM folder")
    _check_integer(cfg.experts_per_token, "experts_per_token", 1)
    check_experts_per_token(cfg.experts_per_token, len(cfg.experts))
    _check_choice(cfg.routing, "routing", ROUTING_MODES)
    temperature = cfg.routing_temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise MoeConfigError(f"config: routing_temperature must be a number > 0, got {temperature!r}")
    _check_choice(cfg.projector, "projector", PROJECTORS)
    if cfg.projector_hidden_size is not None:
        _check_integer(cfg.projector_hidden_size, "projector_hidden_size", 1)
    shared = cfg.shared_embeddings
    if shared != "average" and (isinstance(shared, bool) or not isinstance(shared, int)
                                or not 0 <= shared < len(cfg.experts)):
        raise MoeConfigError(f"config: shared_embeddings must be 'average' or an expert index in "
                             f"[0, {len(cfg.experts) - 1}], got {shared!r}")
    if not isinstance(cfg.expert_tables, bool):
        raise MoeConfigError(f"config: expert_tables must be true or false, got {cfg.expert_tables!r}")
    check_dtype(cfg.dtype)
    _check_integer(cfg.seed, "seed", 0)


def _expert_folder(entry, index: int) -> Path:
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"source_model"})
        if unknown or "source_model" not in entry:
            raise MoeConfigError(
                f"config: experts[{index}] must be a folder or {{source_model: <folder>}}, got {entry!r}"
            )
        entry = entry["source_model"]
    return model_folder(entry, f"experts[{index}]")


def parse_hetero_config(source: Union[str, os.PathLike, dict, HeteroBuildConfig]) -> HeteroBuildConfig:
    """Read and validate a heterogeneous MoE configuration (YAML path, dict, or a config object,
    which was validated when it was made)."""
    if isinstance(source, HeteroBuildConfig):
        return source
    data = read_config_mapping(source)
    unknown = sorted(set(data) - set(HETERO_KEYS))
    if unknown:
        raise MoeConfigError(f"config: unknown key(s) {', '.join(unknown)} for mode heterogeneous; "
                             f"valid keys: {', '.join(HETERO_KEYS)}")
    if data.get("mode", "heterogeneous") != "heterogeneous":
        raise MoeConfigError(f"config: mode is {data['mode']!r}; a heterogeneous MoE needs mode: heterogeneous")
    routing = data.get("routing", ROUTING_MODES[0])
    return HeteroBuildConfig(  # validated on construction (check_hetero_config)
        experts=[_expert_folder(e, i) for i, e in enumerate(listed(data, "experts"))],
        experts_per_token=data.get("experts_per_token", 1),
        routing=routing,
        routing_temperature=data.get("routing_temperature", 1.0),
        projector=data.get("projector", PROJECTORS[0]),
        projector_hidden_size=data.get("projector_hidden_size"),
        shared_embeddings=data.get("shared_embeddings", "average"),
        expert_tables=data.get("expert_tables", routing == "perplexity"),
        dtype=parse_dtype(data.get("dtype"), "dtype", MoeConfigError),
        seed=data.get("seed", 0),
    )


def _head_key(reader: CheckpointReader) -> str:
    """The expert's output table: lm_head.weight, or the embedding of a tied model."""
    return HEAD_KEY if HEAD_KEY in reader.keys() else EMBED_KEY


class HeteroMoeBuilder:
    """Plans and writes one heterogeneous MoE build (see the module docstring)."""

    def __init__(self, cfg: HeteroBuildConfig):
        self.cfg = cfg
        self.readers = [CheckpointReader(folder) for folder in cfg.experts]
        self.configs = [model_config(reader, f"experts[{i}]") for i, reader in enumerate(self.readers)]
        self._check_experts()
        self.widths = [reader.info(EMBED_KEY).shape[1] for reader in self.readers]
        self.hidden_size = max(self.widths)
        self.vocab_size = max(reader.info(EMBED_KEY).shape[0] for reader in self.readers)
        self.out_dtype = cfg.dtype or checkpoint_dtype(self.configs[0]) or self.readers[0].info(EMBED_KEY).dtype
        self.model_config = self._model_config()
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self.tasks = self._plan()

    # ---- validation -------------------------------------------------------------------------
    def _check_experts(self) -> None:
        for index, (folder, config, reader) in enumerate(zip(self.cfg.experts, self.configs, self.readers)):
            where = f"experts[{index}] ({folder})"
            architectures = config.get("architectures") or []
            if not any(name in CAUSAL_LM_CLASSES for name in architectures):
                raise MoeConfigError(
                    f"{where} is not a causal language model (config.json architectures: {architectures or 'none'}); "
                    "heterogeneous MoE experts must be dense causal LMs (e.g. LlamaForCausalLM, Qwen2ForCausalLM)"
                )
            if config.get("model_type") not in MODEL_MAPPING_NAMES:
                raise MoeConfigError(f"{where}: model_type {config.get('model_type')!r} has no transformers base model")
            keys = reader.keys()
            stray = [k for k in keys if not k.startswith("model.") and k != HEAD_KEY]
            if EMBED_KEY not in keys or stray:
                raise MoeConfigError(
                    f"{where}: expected a decoder-only checkpoint with {EMBED_KEY}, model.* and {HEAD_KEY} tensors; "
                    f"found {'no ' + EMBED_KEY if EMBED_KEY not in keys else 'also ' + ', '.join(stray[:3])}"
                )
            embed = reader.info(EMBED_KEY)
            if embed.shape[1] != config.get("hidden_size"):
                raise MoeConfigError(f"{where}: {EMBED_KEY} has shape {list(embed.shape)} but config.json says "
                                     f"hidden_size {config.get('hidden_size')}")
            if HEAD_KEY not in keys and not config.get("tie_word_embeddings", False):
                raise MoeConfigError(
                    f"{where}: no {HEAD_KEY} and tie_word_embeddings is not set; the checkpoint is incomplete"
                )
            if index:
                self._check_tokenizer(folder, where)

    def _check_tokenizer(self, folder: Path, where: str) -> None:
        """Refuse an expert (`folder`, described by `where`) whose tokenizer.json vocabulary differs
        from experts[0]'s, naming the folder that lacks tokenizer.json when only one has it."""
        reference = self.cfg.experts[0]
        check_comparable_tokenizers(folder, where, reference, f"experts[0] ({reference})")
        if not same_vocabulary(folder, reference):
            raise MoeConfigError(
                f"{where} has a different tokenizer from experts[0] ({reference}): the experts of a heterogeneous "
                "MoE share one embedding and head, so they must share a tokenizer (tokenizer.json vocabulary)"
            )

    # ---- planning ---------------------------------------------------------------------------
    def _model_config(self) -> dict:
        expert_configs = [{k: v for k, v in c.items() if k != "quantization_config"} for c in self.configs]
        first = self.configs[0]
        data = {
            "model_type": MODEL_TYPE,
            "architectures": ["MoefuseHeteroForCausalLM"],
            "expert_configs": expert_configs,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_experts_per_tok": self.cfg.experts_per_token,
            "routing": self.cfg.routing,
            "routing_temperature": self.cfg.routing_temperature,
            "projector": self.cfg.projector,
            "projector_hidden_size": self.cfg.projector_hidden_size,
            "expert_tables": self.cfg.expert_tables,
            "tie_word_embeddings": False,
            "bos_token_id": first.get("bos_token_id"),
            "eos_token_id": first.get("eos_token_id"),
            "pad_token_id": first.get("pad_token_id"),
            "dtype": DTYPE_CONFIG_NAMES.get(self.out_dtype, "float32"),
        }
        MoefuseHeteroConfig.from_dict(data)  # refuses what the model class could not load
        return data

    def _plan(self) -> List[OutputTask]:
        tasks = [self._table_task(EMBED_KEY, lambda reader: EMBED_KEY), self._table_task(HEAD_KEY, _head_key)]
        num_experts, width = len(self.readers), self.hidden_size
        tasks.append(self._generated("model.router.weight", (num_experts, width), self._normal, "N(0, 0.02^2)"))
        hidden = self.cfg.projector_hidden_size or width
        for e, d in enumerate(self.widths):
            for side, (d_in, d_out) in (("in", (width, d)), ("out", (d, width))):
                prefix = f"model.projectors_{side}.{e}."
                tasks.append(self._generated(prefix + "weight", (d_out, d_in), torch.eye, "selection" if side == "in"
                                             else "zero-padding"))
                if self.cfg.projector == "mlp":
                    tasks.append(self._generated(prefix + "up_weight", (hidden, d_in), self._normal, "N(0, 0.02^2)"))
                    tasks.append(self._generated(prefix + "down_weight", (d_out, hidden), torch.zeros, "zeros"))
        for e, reader in enumerate(self.readers):
            for key in reader.keys():
                if key.startswith("model.") and (key != EMBED_KEY or self.cfg.expert_tables):
                    tasks.append(self._copy_task(f"model.experts.{e}.{key[len('model.'):]}", reader, key))
        if self.cfg.expert_tables:
            tasks.extend(self._copy_task(f"expert_heads.{e}.weight", reader, _head_key(reader))
                         for e, reader in enumerate(self.readers))
        return tasks

    def _table_task(self, out_key: str, key_of: Callable[[CheckpointReader], str]) -> OutputTask:
        """mean_e pad(table_e), or pad(table_i) with `shared_embeddings: i`."""
        shared = self.cfg.shared_embeddings
        chosen = list(enumerate(self.readers)) if shared == "average" else [(shared, self.readers[shared])]
        sources = [Source(reader, key_of(reader)) for _, reader in chosen]
        shape = (self.vocab_size, self.hidden_size)

        def produce() -> torch.Tensor:
            out = torch.empty(shape, dtype=self.out_dtype)
            for start in range(0, shape[0], TABLE_ROWS):  # fp32 sums of a few rows at a time
                total = torch.zeros(min(TABLE_ROWS, shape[0] - start), shape[1])
                for source in sources:
                    rows = source.reader.tensor(source.key)[start:start + TABLE_ROWS]
                    total[: rows.shape[0], : rows.shape[1]] += rows.float()
                out[start:start + total.shape[0]] = total / len(sources)
            return out
        what = "average of the experts' (zero-padded)" if shared == "average" else f"expert {shared}'s (zero-padded)"
        return OutputTask(OutputTensor(out_key, shape, self.out_dtype), produce, sources, what)

    def _normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self._generator) * INIT_STD

    def _generated(self, key: str, shape, make: Callable[..., torch.Tensor], what: str) -> OutputTask:
        return OutputTask(OutputTensor(key, tuple(shape), self.out_dtype), lambda: make(*shape).to(self.out_dtype), [],
                          what)

    def _copy_task(self, out_key: str, reader: CheckpointReader, key: str) -> OutputTask:
        info = reader.info(key)
        dtype = self.out_dtype if info.dtype.is_floating_point else info.dtype
        return OutputTask(OutputTensor(out_key, info.shape, dtype), lambda: reader.tensor(key).to(dtype),
                          [Source(reader, key)], f"copy of {reader.folder}")

    # ---- output -----------------------------------------------------------------------------
    def describe(self) -> str:
        """The plan as text: one line per output tensor, then the total size."""
        lines = [f"{t.output.key} {list(t.output.shape)} {t.output.dtype}: {t.what}" for t in self.tasks]
        total = sum(t.output.nbytes for t in self.tasks)
        lines.append(f"{len(self.tasks)} tensors, {total / 1e6:.1f} MB; shared width D={self.hidden_size}, "
                     f"experts' widths {self.widths}")
        return "\n".join(lines)

    def write(self, out_dir: Path, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE, progress: bool = True,
              overwrite: bool = False) -> Path:
        return write_tasks(self.tasks, out_dir, self.cfg.experts[0], self.model_config, self.input_folders(),
                           max_shard_size=max_shard_size, progress=progress, overwrite=overwrite)

    def input_folders(self) -> List[Path]:
        return [reader.folder for reader in self.readers]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def build_hetero_moe(config: Union[str, os.PathLike, dict, HeteroBuildConfig], out_dir: Union[str, os.PathLike], *,
                     max_shard_size=DEFAULT_MAX_SHARD_SIZE, progress: bool = True, overwrite: bool = False,
                     dry_run: bool = False) -> Union[Path, str]:
    """Build a heterogeneous MoE checkpoint (`moefuse_hetero`) from the dense causal LMs described
    by `config` (YAML path, dict or `HeteroBuildConfig`; see the module docstring) into `out_dir`,
    written atomically. Returns the output folder, or with `dry_run` the plan as text."""
    return run_builder(HeteroMoeBuilder(parse_hetero_config(config)), out_dir, max_shard_size=max_shard_size,
                       progress=progress, overwrite=overwrite, dry_run=dry_run)
