"""Build a homogeneous MoE from dense models of one architecture (MergeME, mergekit-moe).

Layer l's expert e is expert model e's FFN of layer l; routers come from `moefuse.moe.routers`;
every other tensor (embeddings, attention, norms, head) is made by the config's `shared_weights`
rules: copied from the base (mergekit-moe), averaged over the experts, or merged onto the base
with any merge method (MergeME: TIES/DARE of the experts' task vectors). With `gate_mode:
perplexity` the output is moefuse's own `moefuse_moe` class (sequence-level perplexity routing,
optionally each expert keeping its own attention).

Planning reads only headers; tensors are then produced one at a time from memory-mapped inputs
and appended to pre-planned shards, so peak memory is a few tensors plus the router computation
(one decoder layer at a time for `hidden`), not the model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from tqdm import tqdm

from moefuse.errors import MergeInputError, MoefuseError, NonfiniteInputError
from moefuse.io.local_files import read_model_config
from moefuse.io.output import (
    DTYPE_CONFIG_NAMES, atomic_output_dir, check_output_dir, copy_generation_config, copy_tokenizer_files,
)
from moefuse.io.safetensors_reader import CheckpointReader
from moefuse.io.safetensors_writer import DEFAULT_MAX_SHARD_SIZE, OutputTensor, ShardedWriter
from moefuse.merge.config import checkpoint_dtype
from moefuse.merge.plan import FLOAT_DTYPES, Source, check_model_count, matching_sources, nonfinite_input
from moefuse.methods import get_method, resolve_params
from moefuse.moe.config import (
    SHARED_METHODS, ExpertSpec, MoeBuildConfig, MoeConfigError, config_mode, parse_moe_config,
)
from moefuse.moe.layouts import Layout, attention_bias_shapes, select_layout
from moefuse.moe.routers import gate_vectors
from moefuse.ops.merge import merge_tensors

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size")


@dataclass
class OutputTask:
    """One output tensor: how to produce it and which input pages to drop afterwards."""

    output: OutputTensor
    produce: Callable[[], torch.Tensor]
    sources: List[Source]
    what: str  # for --dry-run


class MoeBuilder:
    """Plans and writes one MoE build (see the module docstring)."""

    def __init__(self, cfg: MoeBuildConfig):
        self.cfg = cfg
        self.base = CheckpointReader(cfg.base_model)
        self._readers: Dict[Path, CheckpointReader] = {self._path_key(cfg.base_model): self.base}
        self.expert_readers = [self._reader(e.source_model) for e in cfg.experts]
        self.shared_readers = [self._reader(e.source_model) for e in cfg.shared_experts]
        self.base_config = model_config(self.base, "base_model")
        self._check_compatible()
        # Models whose versions of the shared tensors are averaged or merged: each distinct expert model once.
        self.merge_readers = list({id(r): r for r in self.expert_readers + self.shared_readers}.values())
        self._check_rules()
        self.layout: Layout = select_layout(cfg, self.base_config.get("model_type"))
        self.out_dtype = cfg.dtype or checkpoint_dtype(self.base_config) or self.base.info(self.base.keys()[0]).dtype
        self._noise = torch.Generator().manual_seed(cfg.seed + 1)
        self.gates: Optional[torch.Tensor] = None
        self.tasks = self._plan()

    @staticmethod
    def _path_key(path: Path) -> Path:
        try:
            return Path(path).resolve()
        except OSError:
            return Path(path)

    def _reader(self, path: Path) -> CheckpointReader:
        key = self._path_key(path)
        if key not in self._readers:
            self._readers[key] = CheckpointReader(path)
        return self._readers[key]

    # ---- validation -------------------------------------------------------------------------
    def _check_compatible(self) -> None:
        """Refuse an expert or shared expert without config.json, of another architecture than the
        base, or with another vocabulary."""
        described = [("experts", i, e, r) for i, (e, r) in enumerate(zip(self.cfg.experts, self.expert_readers))]
        described += [("shared_experts", i, e, r) for i, (e, r) in enumerate(zip(self.cfg.shared_experts, self.shared_readers))]
        for group, index, expert, reader in described:
            fields = {f: model_config(reader, f"{group}[{index}]").get(f) for f in ARCHITECTURE_FIELDS}
            where = f"{group}[{index}] ({expert.source_model})"
            self._check_architecture(fields, where)
            self._check_vocabulary(fields["vocab_size"], expert.source_model, where)

    def _check_architecture(self, fields: Dict[str, object], where: str) -> None:
        """Refuse an expert (described by `where`) whose ARCHITECTURE_FIELDS, but vocab_size, differ from the base's."""
        differing = [f"{f} {fields[f]} vs {self.base_config.get(f)}" for f in ARCHITECTURE_FIELDS
                     if f != "vocab_size" and fields[f] != self.base_config.get(f)]
        if differing:
            raise MoeConfigError(
                f"{where} does not share the base's architecture "
                f"({'; '.join(differing)}): FFN experts of one MoE layer must come from models of one "
                "architecture. Experts of different architectures or sizes need a heterogeneous MoE "
                "(MergeME's per-expert layer stacks with projectors): use mode: heterogeneous."
            )

    def _check_vocabulary(self, vocab_size: object, folder: Path, where: str) -> None:
        """Refuse an expert (`folder`, described by `where`) whose vocab_size or tokenizer.json vocabulary
        differs from the base's, naming the folder that lacks tokenizer.json when only one has it."""
        base, base_where = self.cfg.base_model, f"the base ({self.cfg.base_model})"
        check_comparable_tokenizers(folder, where, base, base_where)
        if vocab_size != self.base_config.get("vocab_size"):
            difference = f"vocab_size {vocab_size} vs {self.base_config.get('vocab_size')}"
        elif not same_vocabulary(folder, base):
            difference = "their tokenizer.json vocabularies differ"
        else:
            return
        raise MoeConfigError(f"{where} has a different vocabulary or tokenizer from {base_where} ({difference}): "
                             "experts must share the base's tokenizer")

    def _check_rules(self) -> None:
        """Validate the shared-weight merge methods' model counts (each distinct expert model is one
        model) and parameters now, not midway through writing."""
        for index, rule in enumerate(self.cfg.shared_weights):
            if rule.method not in SHARED_METHODS:
                try:
                    spec = get_method(rule.method)
                    check_model_count(spec, len(self.merge_readers), "", "distinct expert model(s)")
                    resolve_params(spec, len(self.merge_readers), dict(rule.parameters))
                except MoefuseError as error:
                    raise MoeConfigError(f"config: shared_weights[{index}] ({rule.method}): {error}") from None

    # ---- planning ---------------------------------------------------------------------------
    def _plan(self) -> List[OutputTask]:
        tasks: List[OutputTask] = []
        layers: Dict[int, List[str]] = {}
        for key in self.base.keys():
            match = LAYER_KEY.match(key)
            if match:
                layers.setdefault(int(match.group(1)), []).append(key)
            else:
                tasks.append(self._shared_task(key))
        num_layers = self.base_config.get("num_hidden_layers", len(layers))
        if sorted(layers) != list(range(num_layers)):
            raise MergeInputError(f"{self.cfg.base_model}: config.json says {num_layers} layers, "
                                  f"the weights hold layers {sorted(layers)}")
        for layer in range(num_layers):
            tasks.extend(self._layer_tasks(layer, layers[layer]))
        return tasks

    def _shared_task(self, key: str) -> OutputTask:
        rule = self.cfg.shared_rule(key)
        info = self.base.info(key)
        if rule.method == "base" or info.dtype not in FLOAT_DTYPES:
            source = Source(self.base, key)
            return OutputTask(self._output(key, info), lambda: self._cast(source), [source], "copy base")
        inputs = matching_sources(self.base, key, self.merge_readers, cast_floats=True)
        if rule.method == "average":
            def produce() -> torch.Tensor:
                tensors = [self._cast(s) for s in inputs]
                return merge_tensors(None, tensors, "linear", out_dtype=self.out_dtype, weight=1.0, normalize=True)
            return OutputTask(self._output(key, info), produce, inputs, "average of the experts")
        base_source = Source(self.base, key)

        def merge() -> torch.Tensor:
            try:
                return merge_tensors(self._cast(base_source), [self._cast(s) for s in inputs],
                                     rule.method, out_dtype=self.out_dtype, **rule.parameters)
            except NonfiniteInputError as error:
                raise nonfinite_input(error, key, base_source, inputs) from None
            except MoefuseError as error:
                raise type(error)(f"shared tensor '{key}': {error}") from None
        return OutputTask(self._output(key, info), merge, [base_source, *inputs], f"{rule.method} {rule.parameters}")

    def _layer_tasks(self, layer: int, keys: List[str]) -> List[OutputTask]:
        layout = self.layout
        tasks = [self._shared_task(k) for k in keys if not layout.dense_layer_tensor(k)]
        if layout.zero_attention_bias:
            tasks.extend(self._zero_bias_tasks(layer, keys))
        hidden = self.base_config["hidden_size"]
        if layout.router_name is not None:
            tasks.append(self._gate_task(layout.router_name(layer), layer, slice(0, len(self.cfg.experts)),
                                         (len(self.cfg.experts), hidden)))
        expert_keys = [k for k in keys if layout.dense_layer_tensor(k)]
        prefix = f"model.layers.{layer}."
        for index, (expert, reader) in enumerate(zip(self.cfg.experts, self.expert_readers)):
            for key in expert_keys:
                tasks.append(self._expert_task(layout.expert_names(layer, index, key[len(prefix):]), key, expert, reader))
        if layout.shared_expert_names is not None:
            for expert, reader in zip(self.cfg.shared_experts, self.shared_readers):
                for key in expert_keys:
                    tasks.append(self._expert_task(layout.shared_expert_names(layer, key[len(prefix):]), key, expert, reader))
            start = len(self.cfg.experts)
            tasks.append(self._gate_task(layout.shared_gate_name(layer), layer, slice(start, start + 1), (1, hidden)))
        return tasks

    def _expert_task(self, out_key: str, key: str, expert: ExpertSpec, reader: CheckpointReader) -> OutputTask:
        source = matching_sources(self.base, key, [reader], cast_floats=True)[0]
        info = self.base.info(key)
        scale = expert.residual_scale if key.endswith("down_proj.weight") else None

        def produce() -> torch.Tensor:
            tensor = source.reader.tensor(source.key)
            if expert.noise_scale is None and scale is None:
                return self._cast(source)
            tensor = tensor.float()
            if expert.noise_scale is not None:
                tensor = tensor + expert.noise_scale * torch.randn(tensor.shape, generator=self._noise)
            if scale is not None:
                tensor = tensor * scale
            return tensor.to(self.out_dtype)
        what = f"expert from {reader.folder}" + (f", noise {expert.noise_scale}" if expert.noise_scale else "") + (
            f", x{scale}" if scale is not None else "")
        return OutputTask(self._output(out_key, info), produce, [source], what)

    def _gate_task(self, key: str, layer: int, rows: slice, shape) -> OutputTask:
        output = OutputTensor(key, tuple(shape), self.out_dtype)
        return OutputTask(output, lambda: self.gates[layer, rows].to(self.out_dtype), [], f"router ({self.cfg.gate_mode})")

    def _zero_bias_tasks(self, layer: int, keys: List[str]) -> List[OutputTask]:
        tasks = []
        for projection, size in attention_bias_shapes(self.base_config).items():
            key = f"model.layers.{layer}.self_attn.{projection}.bias"
            if key not in keys:
                output = OutputTensor(key, (size,), self.out_dtype)
                tasks.append(OutputTask(output, lambda size=size: torch.zeros(size, dtype=self.out_dtype), [], "zeros"))
        return tasks

    def _output(self, key: str, info) -> OutputTensor:
        dtype = self.out_dtype if info.dtype in FLOAT_DTYPES else info.dtype
        return OutputTensor(key, tuple(info.shape), dtype)

    def _cast(self, source: Source) -> torch.Tensor:
        """`source`'s tensor, cast to the output dtype when floating (FLOAT_DTYPES): inputs stored in
        differing floating dtypes are merged and written in that one, as mergekit-moe does."""
        tensor = source.reader.tensor(source.key)
        return tensor.to(self.out_dtype) if tensor.dtype in FLOAT_DTYPES else tensor

    # ---- running ----------------------------------------------------------------------------
    def output_config(self) -> dict:
        config = self.layout.make_config(self.base_config, self.cfg)
        if self.out_dtype in DTYPE_CONFIG_NAMES:
            config["dtype"] = DTYPE_CONFIG_NAMES[self.out_dtype]
        return config

    def describe(self) -> str:
        largest = max(t.output.nbytes for t in self.tasks)
        total = sum(t.output.nbytes for t in self.tasks)
        lines = [
            f"output architecture: {self.layout.name} ({self.output_config()['architectures'][0]})",
            f"base: {self.cfg.base_model}",
            *[f"expert {i}: {e.source_model}" for i, e in enumerate(self.cfg.experts)],
            *[f"shared expert {i}: {e.source_model}" for i, e in enumerate(self.cfg.shared_experts)],
            f"gate mode: {self.cfg.gate_mode}, experts per token: {self.cfg.experts_per_token}, dtype: {self.out_dtype}",
            f"tensors: {len(self.tasks)}, output size: {total / 1e9:.3f} GB",
            f"expected peak memory: about {(len(self._readers) + 2) * largest / 1e9:.3f} GB "
            "(one tensor per input model, the output and the one being written) plus the router computation",
            *[f"  {t.output.key} {list(t.output.shape)} {t.output.dtype}: {t.what}" for t in self.tasks],
        ]
        return "\n".join(lines)

    def compute_gates(self) -> None:
        if self.layout.router_name is None:
            return
        hidden = self.base_config["hidden_size"]
        self.gates = gate_vectors(self.cfg.gate_mode, self.cfg.gate_experts, self.cfg.base_model, self.base,
                                  self.base_config["num_hidden_layers"], hidden, self.cfg.seed)

    def write(self, out_dir: Path, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE, progress: bool = True,
              overwrite: bool = False) -> Path:
        self.compute_gates()
        return write_tasks(self.tasks, out_dir, self.cfg.base_model, self.output_config(), self.input_folders(),
                           max_shard_size=max_shard_size, progress=progress, overwrite=overwrite)

    def input_folders(self) -> List[Path]:
        return [reader.folder for reader in self._readers.values()]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


def _vocabulary(folder: Path) -> Optional[str]:
    """The tokenizer's vocabulary (tokenizer.json's model vocab and merges, and added tokens) as
    canonical JSON, or None when the folder has no tokenizer.json."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MergeInputError(f"{path} is not valid JSON ({error})") from None
    model = data.get("model") or {}
    return json.dumps([model.get("vocab"), model.get("merges"), data.get("added_tokens")], sort_keys=True)


def write_tasks(tasks: List[OutputTask], out_dir: Path, files_source: Path, model_config: dict,
                inputs: List[Path], *, max_shard_size, progress: bool, overwrite: bool) -> Path:
    """Produce and write every task's tensor, in order, into pre-planned shards of an atomically
    renamed `out_dir`, dropping each task's input pages once it is written; then copy the
    generation config and tokenizer of `files_source` and write `model_config` as config.json."""
    total = sum(t.output.nbytes for t in tasks)
    with atomic_output_dir(out_dir, overwrite, inputs) as partial, \
            tqdm(total=total, unit="B", unit_scale=True, desc="building MoE", disable=not progress) as bar:
        writer = ShardedWriter(partial, [t.output for t in tasks], max_shard_size, metadata={"producer": "moefuse"})
        try:
            for task in tasks:
                writer.write(task.output.key, task.produce())
                for source in task.sources:
                    source.reader.release([source.key])
                bar.update(task.output.nbytes)
        except BaseException:
            writer.abort()
            raise
        writer.finish()
        copy_generation_config(files_source, partial)
        copy_tokenizer_files(files_source, partial)
        (partial / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    return Path(out_dir)


def model_config(reader: CheckpointReader, where: str) -> dict:
    """The config.json of `reader`'s folder as a dict; a folder without one (or with an invalid one)
    is refused, naming `where` (the config option that points to it)."""
    try:
        return read_model_config(reader.folder)
    except MoefuseError as error:
        raise MoeConfigError(f"{where}: {error}") from None


def check_comparable_tokenizers(folder: Path, where: str, reference: Path, reference_where: str) -> None:
    """Refuse two model folders of which only one has tokenizer.json: the vocabularies cannot be
    compared, so the folder lacking it is named (`where`, `reference_where` describe the folders)."""
    has, reference_has = [(Path(f) / "tokenizer.json").is_file() for f in (folder, reference)]
    if has == reference_has:
        return
    lacking, other = (reference_where, where) if has else (where, reference_where)
    raise MoeConfigError(f"{lacking} has no tokenizer files (no tokenizer.json), so its vocabulary cannot be "
                         f"checked against {other}'s; copy the tokenizer files of the model it was made from into it")


def same_vocabulary(folder: Path, reference: Path) -> bool:
    """Whether two tokenizers share a vocabulary (byte-identical tokenizer.json files do)."""
    mine, theirs = Path(folder) / "tokenizer.json", Path(reference) / "tokenizer.json"
    if mine.exists() and theirs.exists() and mine.read_bytes() == theirs.read_bytes():
        return True
    return _vocabulary(folder) == _vocabulary(reference)


def build_moe(config: Union[str, os.PathLike, dict, MoeBuildConfig], out_dir: Union[str, os.PathLike], *,
              max_shard_size=DEFAULT_MAX_SHARD_SIZE, progress: bool = True, overwrite: bool = False,
              dry_run: bool = False) -> Union[Path, str]:
    """Build an MoE checkpoint from dense models described by `config` (a mergekit-moe YAML
    path, a dict, or a `MoeBuildConfig`) into `out_dir`, written atomically.

    Returns the output folder, or with `dry_run` the plan as text (nothing is written).
    A config with `mode: heterogeneous` is built by `moefuse.moe.build_hetero.build_hetero_moe`."""
    if config_mode(config) == "heterogeneous":
        from moefuse.moe.build_hetero import build_hetero_moe  # it imports this module

        return build_hetero_moe(config, out_dir, max_shard_size=max_shard_size, progress=progress,
                                overwrite=overwrite, dry_run=dry_run)
    return run_builder(MoeBuilder(parse_moe_config(config)), out_dir, max_shard_size=max_shard_size,
                       progress=progress, overwrite=overwrite, dry_run=dry_run)


def run_builder(builder, out_dir: Union[str, os.PathLike], *, max_shard_size, progress: bool, overwrite: bool,
                dry_run: bool) -> Union[Path, str]:
    """`builder.describe()` (the plan as text) with `dry_run`, else `builder.write(out_dir, ...)`
    (the output folder); the builder's input readers are closed either way."""
    try:
        if dry_run:
            return builder.describe()
        check_output_dir(out_dir, overwrite, builder.input_folders())  # before the gates are computed
        return builder.write(Path(out_dir), max_shard_size=max_shard_size, progress=progress, overwrite=overwrite)
    finally:
        builder.close()
