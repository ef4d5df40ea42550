"""Plan a merge given as layer slices (mergekit's `slices`): which input layers make each output layer.

Output layer `offset + i` of a slice merges layer `start_j + i` of each source j; the tensors
outside the layer stack (embeddings before it, final norm and LM head after it) are merged from the
first slice's sources and the last slice's, at t = 0, as mergekit does. The output config is the
base model's (else the first source's), with `num_hidden_layers` and, where the config lists one
per layer, `layer_types` rewritten for the new stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from moefuse.errors import MergeConfigError, MergeInputError
from moefuse.io.lora import open_checkpoint
from moefuse.io.safetensors_reader import CheckpointReader
from moefuse.merge.config import MergeConfig, OutputSlice
from moefuse.merge.plan import (
    FLOAT_DTYPES,
    LAYER_PATTERN,
    MergePlan,
    Source,
    TensorTask,
    _check_parameter_names,
    _num_layers,
    _resolve_task_params,
    same_model,
    check_model_count,
    checked_sources,
    find_source,
    merged_task,
    rows_may_differ,
)
from moefuse.methods import MethodSpec, get_method


def renumber(key: str, layer: int) -> str:
    """`key` (a layer tensor's name, `...layers.N....`) with its layer number replaced by `layer`."""
    match = LAYER_PATTERN.search(key)
    return f"{key[:match.start(1)]}{layer}{key[match.end(1):]}"


class _Readers:
    """One CheckpointReader per model folder and LoRA adapter, opened on first use, in order of first use."""

    def __init__(self):
        self.opened: List[CheckpointReader] = []

    def __call__(self, path: Path, adapter: Optional[Path] = None) -> CheckpointReader:
        for reader in self.opened:
            if same_model(reader.folder, reader.adapter_folder, path, adapter):
                return reader
        self.opened.append(open_checkpoint(path, adapter))
        return self.opened[-1]


@dataclass
class _SliceInputs:
    """One slice's models: the base (with its layer range) if the method takes one, and the others."""

    base: Optional[Tuple[CheckpointReader, int]]  # (reader, first layer)
    inputs: List[Tuple[CheckpointReader, int]]
    parameters: List[Dict[str, Any]]  # the inputs' own parameters
    shared: Dict[str, Any]  # the slice's parameters

    def sources(self, key_of) -> Tuple[Optional[Source], List[Source]]:
        """(base source, input sources) for the key `key_of(reader, first layer)` in each model."""
        base = find_source(self.base[0], key_of(*self.base)) if self.base else None
        return base, [find_source(reader, key_of(reader, first)) for reader, first in self.inputs]


def _slice_inputs(config: MergeConfig, spec: MethodSpec, index: int, piece: OutputSlice,
                  readers: _Readers) -> _SliceInputs:
    where = f"slices[{index}]"
    base_path, base_adapter = (piece.base_model, piece.base_adapter) if piece.base_model is not None \
        else (config.base_model, config.base_adapter)
    entries = list(piece.sources)
    base = None
    if spec.uses_base and base_path is not None:
        found = [source for source in entries if same_model(source.path, source.adapter, base_path, base_adapter)]
        if not found:  # as mergekit: a configured base must be among the sources (optional bases too)
            raise MergeConfigError(
                f"config: {where}: merge_method '{spec.name}' takes its base from the slice's sources, but the base "
                f"model {base_path} is not among them; add it to {where}.sources with a layer_range"
            )
        entries.remove(found[0])
        base = (readers(found[0].path, found[0].adapter), found[0].layer_range[0])
    check_model_count(spec, len(entries), f"config: {where}: ", "source(s)", has_base=base is not None)
    for j, source in enumerate(piece.sources):
        layers = _num_layers(readers(source.path, source.adapter))
        if source.layer_range[1] > layers:
            raise MergeConfigError(f"config: {where}.sources[{j}].layer_range {list(source.layer_range)} goes past "
                                   f"the {layers} layers of {source.path}")
    return _SliceInputs(base, [(readers(s.path, s.adapter), s.layer_range[0]) for s in entries], [s.parameters for s in entries],
                        piece.parameters)


def _task(config: MergeConfig, key: str, parts: _SliceInputs, key_of, t: float) -> TensorTask:
    """Output tensor `key` merged from `key_of(reader, first layer)` of each of the slice's models."""
    base, inputs = parts.sources(key_of)
    reference = base if base is not None else inputs[0]
    info = reference.reader.info(reference.key)
    checked_sources(reference, inputs, cast_floats=True, any_rows=rows_may_differ(config, key))
    if info.dtype not in FLOAT_DTYPES:  # copied from the first source, as stored
        return TensorTask(key, info.shape, info.dtype, base, inputs, {}, merge=False)
    params = _resolve_task_params(config, key, t, parts.parameters, shared=[parts.shared],
                                  model_keys=[source.key for source in inputs])
    return merged_task(config, key, info.shape, base, inputs, params)


def _layer_keys(reader: CheckpointReader, layer: int) -> List[str]:
    return [key for key in reader.keys() if (m := LAYER_PATTERN.search(key)) and int(m.group(1)) == layer]


def build_sliced_plan(config: MergeConfig) -> MergePlan:
    """Open every source's headers and plan each output tensor, slice by slice."""
    spec = get_method(config.merge_method)
    _check_parameter_names(config, [p for piece in config.slices
                                    for p in (piece.parameters, *[s.parameters for s in piece.sources])])
    readers = _Readers()
    base = readers(config.base_model, config.base_adapter) if config.base_model is not None else None
    parts = [_slice_inputs(config, spec, i, piece, readers) for i, piece in enumerate(config.slices)]
    first = config.slices[0].sources[0]
    config_reader = base if base is not None else readers(first.path, first.adapter)
    outside = [key for key in config_reader.keys() if not LAYER_PATTERN.search(key)]
    before = [key for key in outside if "embed" in key]

    tasks = [_task(config, key, parts[0], lambda reader, first, key=key: key, 0.0) for key in before]
    layer_origins: List[Tuple[CheckpointReader, int]] = []  # per output layer: the model and layer it follows
    for piece, part in zip(config.slices, parts):
        template_reader, template_first = part.base or part.inputs[0]
        for i in range(piece.length):
            out_layer = len(layer_origins)
            layer_origins.append((template_reader, template_first + i))
            t = i / (piece.length - 1) if piece.length > 1 else 1.0
            keys = _layer_keys(template_reader, template_first + i)
            if not keys:
                raise MergeInputError(f"{template_reader.folder} has no tensors for layer {template_first + i}")
            for key in keys:
                tasks.append(_task(config, renumber(key, out_layer), part,
                                   lambda reader, first, key=key, i=i: renumber(key, first + i), t))
    tasks += [_task(config, key, parts[-1], lambda reader, first, key=key: key, 0.0)
              for key in outside if key not in before]
    models = [reader for reader in readers.opened if reader is not base]
    if base is None:
        models.remove(config_reader)
        models.insert(0, config_reader)
    return MergePlan(config, base, models, tasks, config_source=config_reader.folder,
                     config_updates=_config_updates(config_reader, layer_origins))


def _config_updates(config_reader: CheckpointReader, layer_origins: List[Tuple[CheckpointReader, int]]) -> Dict:
    """The output config's entries that follow the new layer stack."""
    updates: Dict[str, Any] = {"num_hidden_layers": len(layer_origins)}
    own_types = config_reader.config().get("layer_types")
    if isinstance(own_types, list):
        listed = {id(reader): reader.config().get("layer_types") or own_types for reader, _ in layer_origins}
        updates["layer_types"] = [listed[id(reader)][min(layer, len(listed[id(reader)]) - 1)]
                                  for reader, layer in layer_origins]
    return updates
