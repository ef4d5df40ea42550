"""Router (gate) initialization for token-routed MoEs, as mergekit-moe defines the modes.

The result is one gate vector per (layer, expert), shape [layers, experts, hidden]; layer l's
router weight is `vectors[l]`.

    random          N(0, 1) entries (torch.randn with a generator seeded by `seed`: the same
                    numbers as mergekit-moe after `torch.manual_seed(seed)`)
    uniform_random  U(-1/sqrt(hidden), 1/sqrt(hidden)), nn.Linear's default
    cheap_embed     v = normalize(sum of the token embeddings of the positive prompts) minus the same
                    for the negative prompts, normalized; the same vector in every layer
    hidden          v_l = mean over the positive prompts of h_l(last token) minus the same for the
                    negative prompts, normalized; h_l is the input of decoder layer l of the base
                    model (`hidden_avg`: the mean over the prompt's tokens instead of the last one)

Prompts are tokenized as mergekit-moe does: the BOS token text, then the prompt, with no other
special tokens. Hidden states are computed layer by layer from the memory-mapped base checkpoint
(one decoder layer in memory at a time, in fp32), not by loading the whole model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import transformers

from moefuse.io.local_files import check_tokenizer_files
from moefuse.io.safetensors_reader import CheckpointError, CheckpointReader
from moefuse.moe.config import ExpertSpec, MoeConfigError

EMBEDDING_KEY = "model.embed_tokens.weight"


def load_tokenizer(folder: Path):
    """The tokenizer of the base model `folder`, which prompt-based gate modes need; a folder
    without tokenizer files, or one transformers cannot load, is refused."""
    try:
        check_tokenizer_files(folder)
    except CheckpointError as error:
        raise MoeConfigError(f"base_model: {error}; prompt-based gate modes need the base model's tokenizer, "
                             "or use gate_mode random") from None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise MoeConfigError(f"cannot load the tokenizer of {folder} ({error}); prompt-based gate modes need the "
                             "base model's tokenizer files, or use gate_mode random") from None


def tokenize_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of `prompt` with the BOS text in front and no other special tokens."""
    ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MoeConfigError(f"the prompt {prompt!r} tokenizes to nothing; give a non-empty prompt")
    return torch.tensor(ids, dtype=torch.long)


def _normalize(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-8)


class LayerwiseModel:
    """The base model's decoder layers, materialized one at a time from the memory map."""

    def __init__(self, folder: Path, reader: CheckpointReader):
        self.reader = reader
        config = transformers.AutoConfig.from_pretrained(str(folder))
        config._attn_implementation = "sdpa"  # a mask of None then means causal
        with torch.device("meta"):
            self.meta_model = _causal_lm(config)
        inner = self.meta_model.model
        self.num_layers = config.num_hidden_layers
        self.rotary = type(inner.rotary_emb)(config=config)

    def layer_inputs(self, sequences: Sequence[torch.Tensor], last_token: bool) -> torch.Tensor:
        """[layers, sequences, hidden]: each sequence's input to each decoder layer, at its last
        token or averaged over its tokens.

        The sequences run as one right-padded batch: under causal attention a token never sees
        the padding after it, so every real token's state equals that of the sequence alone."""
        lengths = torch.tensor([len(ids) for ids in sequences])
        ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
        real = (torch.arange(ids.shape[1])[None] < lengths[:, None]).unsqueeze(-1)
        embedding = self.reader.tensor(EMBEDDING_KEY)
        states = embedding[ids].float()
        del embedding
        self.reader.release([EMBEDDING_KEY])
        out = []
        for layer_index in range(self.num_layers):
            if last_token:
                out.append(states[torch.arange(len(sequences)), lengths - 1])
            else:
                out.append((states * real).sum(dim=1) / lengths[:, None])
            if layer_index + 1 < self.num_layers:  # the last layer's output is not a layer input
                states = self._run_layer(layer_index, states)
        return torch.stack(out)

    def _run_layer(self, index: int, states: torch.Tensor) -> torch.Tensor:
        prefix = f"model.layers.{index}."
        keys = [k for k in self.reader.keys() if k.startswith(prefix)]
        layer = self.meta_model.model.layers[index]
        layer.load_state_dict({k[len(prefix):]: self.reader.tensor(k).float() for k in keys}, assign=True, strict=True)
        positions = torch.arange(states.shape[1])[None]
        with torch.no_grad():
            output = layer(states, attention_mask=None, position_ids=positions,
                           position_embeddings=self.rotary(states, positions))
        layer.to("meta")
        self.reader.release(keys)
        return output[0] if isinstance(output, tuple) else output


def _causal_lm(config):
    """The model config.json names, built from its family's module alone; else the Auto class's."""
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def _prompt_index(experts: Sequence[ExpertSpec]) -> Dict[str, int]:
    prompts: Dict[str, int] = {}
    for expert in experts:
        for prompt in expert.positive_prompts + expert.negative_prompts:
            prompts.setdefault(prompt, len(prompts))
    return prompts


def _combine(per_prompt: torch.Tensor, experts: Sequence[ExpertSpec], index: Dict[str, int],
             normalize_each: bool) -> torch.Tensor:
    """Gate vectors [layers, experts, hidden] from per-prompt vectors [layers, prompts, hidden]:
    mean over positives minus mean over negatives, normalized (experts without prompts get 0)."""
    def mean(prompts: List[str]) -> torch.Tensor:
        vector = per_prompt[:, [index[p] for p in prompts]].mean(dim=1)
        return _normalize(vector) if normalize_each else vector

    vectors = []
    for expert in experts:
        if not expert.positive_prompts:
            vectors.append(torch.zeros_like(per_prompt[:, 0]))
            continue
        vector = mean(expert.positive_prompts)
        if expert.negative_prompts:
            vector = vector - mean(expert.negative_prompts)
        vectors.append(_normalize(vector))
    return torch.stack(vectors, dim=1)


def gate_vectors(mode: str, experts: Sequence[ExpertSpec], base_folder: Path, reader: CheckpointReader,
                 num_layers: int, hidden_size: int, seed: int) -> torch.Tensor:
    """Gate vectors [num_layers, len(experts), hidden_size] (fp32) for gate mode `mode`."""
    shape = (num_layers, len(experts), hidden_size)
    if mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden_size)
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 * scale - scale
    tokenizer = load_tokenizer(base_folder)
    index = _prompt_index(experts)
    sequences = [tokenize_prompt(tokenizer, prompt) for prompt in index]
    if mode == "cheap_embed":
        embedding = reader.tensor(EMBEDDING_KEY)  # only the prompts' rows are converted to fp32
        sums = torch.stack([embedding[ids].float().sum(dim=0) for ids in sequences])
        reader.release([EMBEDDING_KEY])
        # mergekit sums the prompts' embeddings, then normalizes: the sum's direction is the mean's.
        return _combine(sums[None].expand(num_layers, -1, -1), experts, index, normalize_each=True)
    if mode in ("hidden", "hidden_avg"):
        per_prompt = LayerwiseModel(base_folder, reader).layer_inputs(sequences, last_token=mode == "hidden")
        return _combine(per_prompt, experts, index, normalize_each=False)
    raise MoeConfigError(f"gate_mode '{mode}' has no router weights")
