"""Plan a checkpoint merge: which tensors, from which files, with which method and parameters.

Planning reads only headers and config files, so every mismatch (missing tensor, shape, dtype,
unknown parameter) is reported before any data is read or written. Floating inputs of one tensor
may differ in dtype: as in mergekit, they are cast to the config's `dtype` before merging (or,
without one, to the type torch arithmetic promotes them to).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from moefuse.errors import MergeConfigError, MergeInputError, NonfiniteInputError
from moefuse.io.lora import open_checkpoint
from moefuse.io.safetensors_reader import CheckpointReader
from moefuse.io.safetensors_writer import OutputTensor
from moefuse.merge.config import MergeConfig, ModelEntry, evaluate_setting
from moefuse.methods import MethodSpec, get_method, resolve_params
from moefuse.methods.base import BASE_AS_INPUT, GLOBAL_SCOPE
from moefuse.ops.merge import merges_row_blocks, torch_scratch_bytes
from moefuse.ops.rowwise import row_block_bytes

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Tensors whose rows are indexed by token id (re-indexed when vocabularies are aligned)
VOCABULARY_TENSORS = ("embed_tokens.weight", "lm_head.weight", "lm_head.bias", "wte.weight", "embed_in.weight",
                      "embed_out.weight", "word_embeddings.weight")


def is_vocabulary_tensor(key: str) -> bool:
    """True for an embedding or LM head tensor (rows indexed by token id)."""
    return key.endswith(VOCABULARY_TENSORS)


@dataclass(frozen=True)
class Source:
    """One input of a tensor: a checkpoint and the key to read there, optionally indexed by a
    permutation (dim, perm) along one dimension (FFN neuron alignment), or re-indexed to the output
    vocabulary (`aligned`: the task's AlignedRows and this source's position among them)."""

    reader: CheckpointReader
    key: str
    permutation: Optional[Tuple[int, torch.Tensor]] = field(default=None, compare=False)
    aligned: Optional[Tuple[Any, int]] = field(default=None, compare=False)

    @property
    def in_memory(self) -> bool:
        """True when the tensor read is a copy in memory, not a view of the memory map."""
        return self.permutation is not None or self.aligned is not None or self.reader.copied(self.key)

    def read(self) -> torch.Tensor:
        if self.aligned is not None:
            rows, position = self.aligned
            return rows.tensor(position)
        tensor = self.reader.tensor(self.key)
        if self.permutation is None:
            return tensor
        dim, perm = self.permutation
        permuted = tensor.index_select(dim, perm)
        self.reader.release([self.key])  # only the in-memory copy is read from here on
        return permuted

    def release(self, start: int = 0, stop: Optional[int] = None) -> None:
        """Drop the pages of flat entries [start, stop) (all by default) from memory (an input
        copied in memory had its pages dropped when the copy was made)."""
        if not self.in_memory:
            self.reader.release_entries(self.key, start, stop)


@dataclass
class TensorTask:
    key: str
    shape: Tuple[int, ...]
    out_dtype: torch.dtype
    base: Optional[Source]
    inputs: List[Source]
    params: Dict[str, Any] = field(default_factory=dict)
    merge: bool = True  # False: copy the base (non-float tensors)
    compute_dtype: Optional[torch.dtype] = None  # the dtype inputs are cast to before merging (None: their own)

    @property
    def sources(self) -> List[Source]:
        return ([self.base] if self.base is not None else []) + self.inputs

    @property
    def output(self) -> OutputTensor:
        return OutputTensor(self.key, self.shape, self.out_dtype)


@dataclass
class MergePlan:
    config: MergeConfig
    base: Optional[CheckpointReader]
    models: List[CheckpointReader]
    tasks: List[TensorTask]
    config_source: Optional[Path] = None  # where config.json comes from (default: the base, else the first model)
    config_updates: Dict[str, Any] = field(default_factory=dict)  # its entries to rewrite (a new layer stack)
    vocabulary: Optional[Any] = None  # the aligned output vocabulary (moefuse.merge.vocabulary), if any

    def __post_init__(self):
        if self.config_source is None:
            self.config_source = (self.base if self.base is not None else self.models[0]).folder

    @property
    def output_bytes(self) -> int:
        return sum(task.output.nbytes for task in self.tasks)

    def peak_bytes_estimate(self, piece_entries: int, writes_in_flight: int) -> int:
        """Merged tensors stream in pieces of `piece_entries`: the inputs' pieces, the output
        piece being computed and up to `writes_in_flight` being written, in the compute dtype
        (fp32 scratch is per tile; the torch-operation merges add `torch_scratch_bytes`). DELLA and
        filter-wise Model Stock stream blocks of whole rows (`row_block_bytes`); copied or aligned tensors count whole. DARE and DELLA add one bit per
        entry and model (their recorded keep decisions)."""
        spec = get_method(self.config.merge_method)

        def piece_bytes(task: TensorTask) -> int:
            numel = math.prod(task.shape)
            itemsize = (task.compute_dtype or task.out_dtype).itemsize
            per_entry = itemsize * len(task.sources) + task.out_dtype.itemsize * (1 + writes_in_flight)
            if self.config.align or not task.merge or any(source.in_memory for source in task.sources):
                return numel * per_entry
            recorded_keeps = (numel + 7) // 8 * len(task.inputs) if spec.sparsifier in ("random", "della") else 0
            if merges_row_blocks(self.config.merge_method, len(task.inputs), task.params, numel):
                return row_block_bytes(spec, task.shape, per_entry, len(task.inputs)) + recorded_keeps
            scratch = torch_scratch_bytes(self.config.merge_method, len(task.inputs), task.params, task.shape)
            return min(numel, piece_entries) * per_entry + scratch + recorded_keeps

        return max((piece_bytes(t) for t in self.tasks), default=0)

    @property
    def readers(self) -> List[CheckpointReader]:
        """The base's reader (if any), then the models'."""
        return ([self.base] if self.base is not None else []) + self.models

    @property
    def folders(self) -> List[Path]:
        """The base's and the models' folders, each once (a linear merge may list its base; a model
        may appear with and without a LoRA adapter)."""
        return list({reader.folder.resolve(): reader.folder for reader in self.readers}.values())

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def layer_position(key: str, num_layers: int) -> float:
    """mergekit's gradient position t: layer / (layers - 1) inside the stack, 0 outside."""
    match = LAYER_PATTERN.search(key)
    if not match:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _num_layers(reader: CheckpointReader) -> int:
    configured = reader.config().get("num_hidden_layers")
    if isinstance(configured, int):
        return configured
    found = [int(m.group(1)) for k in reader.keys() for m in [LAYER_PATTERN.search(k)] if m]
    return max(found) + 1 if found else 1


def find_source(reader: CheckpointReader, key: str) -> Source:
    """The source for `key` in `reader`, resolving a tied LM head the way transformers does."""
    stored = reader.stored_key(key)
    if stored is not None:
        return Source(reader, stored)
    raise MergeInputError(f"tensor '{key}' is missing from {reader.folder}; the models must share an architecture")


def checked_sources(reference: Source, sources: List[Source], cast_floats: bool = False,
                    any_rows: bool = False) -> List[Source]:
    """`sources`, checked to have the shape and dtype of `reference`'s tensor; with `cast_floats`
    (a merge that casts its inputs), floating dtypes (FLOAT_DTYPES) may differ from each other;
    with `any_rows` (a vocabulary tensor to be re-indexed), so may the number of rows."""
    info = reference.reader.info(reference.key)
    for source in sources:
        other = source.reader.info(source.key)
        castable = cast_floats and {other.dtype, info.dtype} <= set(FLOAT_DTYPES)
        same_shape = other.shape[1:] == info.shape[1:] and len(other.shape) == len(info.shape) if any_rows \
            else other.shape == info.shape
        if not same_shape or (other.dtype != info.dtype and not castable):
            vocabulary = ("; if their vocabularies differ, set tokenizer_source (base, union or a model) to align "
                          "them by token" if is_vocabulary_tensor(reference.key) and not any_rows else "")
            raise MergeInputError(
                f"tensor '{reference.key}': {source.reader.folder} has shape {list(other.shape)} {other.dtype} "
                f"('{source.key}'), but {reference.reader.folder} has {list(info.shape)} {info.dtype}; "
                f"the models must share an architecture{vocabulary}"
            )
    return sources


def matching_sources(reference: CheckpointReader, key: str, readers: List[CheckpointReader],
                     cast_floats: bool = False, any_rows: bool = False) -> List[Source]:
    """`key` in each of `readers`, checked to have the reference's shape and dtype (floating
    dtypes, and rows with `any_rows`, may differ; see `checked_sources`)."""
    return checked_sources(Source(reference, key), [find_source(r, key) for r in readers], cast_floats, any_rows)


def rows_may_differ(config: MergeConfig, key: str) -> bool:
    """True for a vocabulary tensor of a merge that aligns vocabularies (its rows are re-indexed)."""
    return config.vocabulary is not None and is_vocabulary_tensor(key)


def nonfinite_input(error: NonfiniteInputError, key: str, base: Optional[Source], inputs: List[Source],
                    advice: str = "") -> NonfiniteInputError:
    """`error` (from merging tensor `key`'s `inputs` onto `base`) restated with the checkpoint
    folder holding the NaN/Inf, followed by `advice`."""
    source = base if error.index is None else inputs[error.index]
    return NonfiniteInputError(f"tensor '{key}' of {source.reader.folder} holds {error.count} NaN/Inf value(s); "
                               f"fix that checkpoint{advice}", error.index, error.count)


def merged_task(config: MergeConfig, key: str, shape: Tuple[int, ...], base: Optional[Source],
                inputs: List[Source], params: Dict[str, Any]) -> TensorTask:
    """The task merging floating `inputs` (onto `base`) into tensor `key`. The inputs are cast to
    the config's `dtype`; without one, inputs stored in differing dtypes are cast to the type torch
    arithmetic promotes them to (what mergekit ends up computing in), and others are merged in
    their own dtype. The output dtype is `out_dtype`, else the one cast to, else the inputs'."""
    dtypes = {source.reader.info(source.key).dtype for source in ([base] if base is not None else []) + inputs}
    promoted = functools.reduce(torch.promote_types, dtypes)
    compute_dtype = config.dtype or (promoted if len(dtypes) > 1 else None)
    return TensorTask(key, shape, config.out_dtype or compute_dtype or promoted, base, inputs, params,
                      compute_dtype=compute_dtype)


def _first_setting(settings: Sequence[Dict[str, Any]], name: str, key: str, t: float) -> Any:
    """mergekit's precedence: the first of `settings` whose `name` has a value for tensor `key`."""
    for setting in settings:
        value = evaluate_setting(setting.get(name), key, t)
        if value is not None:
            return value
    return None


def _global_set_per_model(method: str, pspec, key: str) -> None:
    """A global parameter given only under models: mergekit ignores it there (taking the default), so
    moefuse warns; a required one cannot be ignored and is refused."""
    where = f"parameter '{pspec.name}' of merge_method '{method}' is global"
    if pspec.default is None:
        raise MergeConfigError(f"tensor '{key}': {where}: set it, for every tensor, in the top-level parameters "
                               "(or a slice's), not in a model's")
    warnings.warn(f"{where}; the value set under a model is ignored (as mergekit ignores it) and the default "
                  f"{pspec.default!r} applies: set it in the top-level parameters", stacklevel=3)


def _resolve_task_params(config: MergeConfig, key: str, t: float, model_params: List[Dict[str, Any]],
                         shared: Sequence[Dict[str, Any]] = (), model_keys: Optional[List[str]] = None) -> Dict[str, Any]:
    """The parameters of output tensor `key`: global ones from `shared` then the config's, per-model
    ones from each model's own (evaluated at its input key, `model_keys[i]`), then those."""
    spec = get_method(config.merge_method)
    shared = [*shared, config.parameters]
    params: Dict[str, Any] = {}
    for pspec in spec.params:
        if pspec.scope == GLOBAL_SCOPE:
            value = _first_setting(shared, pspec.name, key, t)
            if value is not None:
                params[pspec.name] = value
            elif any(pspec.name in own for own in model_params):
                _global_set_per_model(spec.name, pspec, key)
            continue
        values = [_first_setting([own, *shared], pspec.name, (model_keys or [key] * len(model_params))[i], t)
                  for i, own in enumerate(model_params)]
        if any(v is not None for v in values):
            if any(v is None for v in values):
                missing = [i for i, v in enumerate(values) if v is None]
                if pspec.default is None:
                    raise MergeConfigError(f"tensor '{key}': parameter '{pspec.name}' is not set for model(s) {missing}")
                values = [pspec.default if v is None else v for v in values]
            params[pspec.name] = values
    resolve_params(spec, len(model_params), params)  # validate ranges now, before any IO
    return params


def _check_parameter_names(config: MergeConfig, model_params: Sequence[Dict[str, Any]]) -> None:
    """Refuse parameter names the method does not take, listing the valid ones."""
    spec = get_method(config.merge_method)
    for source in [config.parameters, *model_params]:
        unknown = sorted(set(source) - set(spec.param_names))
        if unknown:
            raise MergeConfigError(
                f"merge_method '{spec.name}' has no parameter {', '.join(map(repr, unknown))}; "
                f"valid parameters: {', '.join(spec.param_names)}"
            )


def check_model_count(spec: MethodSpec, count: int, where: str, what: str, has_base: bool = True) -> None:
    """Refuse `count` models (besides the base, if the merge has one in the base's role) unless `spec`
    takes that many (`where`: the place in the config)."""
    if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
        bound = f"exactly {spec.min_models}" if spec.min_models == spec.max_models else f"at least {spec.min_models}"
        besides = " besides the base" if spec.uses_base and has_base else ""
        raise MergeConfigError(f"{where}merge_method '{spec.name}' needs {bound} {what}{besides}, got {count}")


def build_plan(config: MergeConfig) -> MergePlan:
    """Open every checkpoint's headers and plan each output tensor (and, if the config names a
    tokenizer, the output vocabulary: see moefuse.merge.vocabulary)."""
    from moefuse.merge.slices import build_sliced_plan  # it builds on this module's helpers

    plan = build_sliced_plan(config) if config.slices else _build_models_plan(config)
    try:
        if config.vocabulary is not None:
            from moefuse.merge.vocabulary import align_vocabulary  # imports transformers (0.6 s)

            align_vocabulary(plan)
    except BaseException:
        plan.close()
        raise
    return plan


def _build_models_plan(config: MergeConfig) -> MergePlan:
    """The plan of a merge of whole `models`."""
    spec = get_method(config.merge_method)
    base = open_checkpoint(config.base_model, config.base_adapter) if config.base_model is not None else None
    entries = _model_entries(config, spec)
    check_model_count(spec, len(entries), "", "model(s)", has_base=base is not None)
    _check_parameter_names(config, [e.parameters for e in entries])
    models = [open_checkpoint(e.path, e.adapter) for e in entries]
    reference = base if base is not None else models[0]
    num_layers = _num_layers(reference)
    tasks: List[TensorTask] = []
    for key in reference.keys():
        info = reference.info(key)
        inputs = matching_sources(reference, key, models, cast_floats=True, any_rows=rows_may_differ(config, key))
        task_base = Source(base, key) if base is not None and spec.uses_base else None
        if info.dtype not in FLOAT_DTYPES:  # copied from the base, as stored
            tasks.append(TensorTask(key, info.shape, info.dtype, task_base, inputs, merge=False))
            continue
        params = _resolve_task_params(config, key, layer_position(key, num_layers), [e.parameters for e in entries])
        tasks.append(merged_task(config, key, info.shape, task_base, inputs, params))
    if not tasks:
        raise MergeInputError(f"{reference.folder} holds no tensors")
    for model in models:
        extra = sorted(set(model.keys()) - set(reference.keys()))
        if extra:
            warnings.warn(
                f"{model.folder} has {len(extra)} tensor(s) that {reference.folder} lacks, which the merged "
                f"model (with {reference.folder}'s architecture) would not load, so they are left out: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}",
                stacklevel=2,
            )
    return MergePlan(config, base, models, tasks)


def _model_entries(config: MergeConfig, spec: MethodSpec) -> List[ModelEntry]:
    """The models merged besides the base: the listed ones, less the base where the method uses it
    as the base; a method without a base role takes a configured base as one more input, as
    mergekit adds it (BASE_AS_INPUT)."""
    if config.base_model is None:
        return list(config.models)
    is_base = [same_model(e.path, e.adapter, config.base_model, config.base_adapter) for e in config.models]
    if spec.uses_base:
        return [e for e, base in zip(config.models, is_base) if not base]
    if spec.base == BASE_AS_INPUT and not any(is_base):
        return [*config.models, ModelEntry(config.base_model, adapter=config.base_adapter)]
    return list(config.models)


def align_plan(plan: MergePlan) -> None:
    """With `align: true`, index every model's FFN tensors so that its neurons match the reference's
    (the base, else the first model) layer by layer; reads those FFN weights once."""
    if not plan.config.align:
        return
    from moefuse.moe.align import checkpoint_ffn_permutations

    reference = plan.base if plan.base is not None else plan.models[0]
    others = [m for m in plan.models if m is not reference]
    position = {id(reader): i for i, reader in enumerate(others)}
    permutations = checkpoint_ffn_permutations(reference, others)
    for task in plan.tasks:
        task.inputs = [
            replace(s, permutation=permutations.get((position[id(s.reader)], s.key))) if id(s.reader) in position else s
            for s in task.inputs
        ]


def _same(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def same_model(path: Path, adapter: Optional[Path], other: Path, other_adapter: Optional[Path]) -> bool:
    """True when two references name the same model folder with the same LoRA adapter (or none)."""
    same_adapter = adapter is None and other_adapter is None or (
        adapter is not None and other_adapter is not None and _same(adapter, other_adapter))
    return same_adapter and _same(path, other)


def _describe_slices(config: MergeConfig) -> List[str]:
    """One line per slice: the output layers it makes and the input layers they come from."""
    lines, offset = [], 0
    for i, piece in enumerate(config.slices):
        sources = ", ".join(f"{s.path} layers {s.layer_range[0]}-{s.layer_range[1] - 1}" for s in piece.sources)
        lines.append(f"slice {i}: output layers {offset}-{offset + piece.length - 1} from {sources}")
        offset += piece.length
    return lines


def describe(plan: MergePlan, piece_entries: int, writes_in_flight: int) -> str:
    """A human-readable summary of the plan (for --dry-run), merging in pieces of `piece_entries`
    with up to `writes_in_flight` output pieces queued for the writer."""
    lines = [
        f"method: {plan.config.merge_method}",
        f"base: {plan.base.name if plan.base else '(none)'}",
        *[f"model {i}: {m.name}" for i, m in enumerate(plan.models)],
        *_describe_slices(plan.config),
        f"tensors: {len(plan.tasks)} ({sum(not t.merge for t in plan.tasks)} copied from the base), "
        f"output {plan.output_bytes / 1e9:.3f} GB",
        f"expected peak memory: about {plan.peak_bytes_estimate(piece_entries, writes_in_flight) / 1e9:.3f} GB "
        "of tensor data (the largest tensor's pieces: its inputs, the output being merged and those being written) "
        "plus the runtime (about 0.25 GB for Python and torch)",
        "parameters:",
    ]
    if plan.config.align:
        lines.insert(-1, "align: each model's FFN neurons are matched to the reference's, layer by layer")
    if plan.vocabulary is not None:
        lines.insert(-1, plan.vocabulary.describe(sum(any(s.aligned for s in t.sources) for t in plan.tasks)))
    template = plan.config.chat_template
    if template is not None:
        named = template == "auto" or "{" not in template
        lines.insert(-1, f"chat template: {template if named else f'the Jinja template given ({len(template)} characters)'}")
    seen = set()
    for task in plan.tasks:
        signature = repr(sorted(task.params.items()))
        if task.merge and signature not in seen:
            seen.add(signature)
            lines.append(f"  from {task.key}: {task.params or '(defaults)'}")
    return "\n".join(lines)
