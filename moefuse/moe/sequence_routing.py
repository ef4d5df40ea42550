"""Sequence-level routing, shared by the `moefuse_moe` and `moefuse_hetero` model classes.

Both mix E experts with one weight row w [E] per sequence (w [batch, E], rows summing to 1),
decided on the first forward of the sequence (prefill) and kept in the KV cache for the tokens
generated after it:
    out = sum_e w_e * Expert_e(input)            (`mix_expert_outputs`; only experts with w_e > 0 run)
Perplexity routing (MergeME's no-fine-tuning heuristic) scores each expert alone on the sequence:
    PPL_e = exp(mean over real pairs (t, t+1) of -log p_e(token_{t+1} | tokens_{<=t})),
    w = softmax((1 / PPL)_topK / temperature) on the K best experts, 0 elsewhere,
and w = 1/E everywhere for a sequence with fewer than 2 real tokens (no pair to score).

Besides this math the module holds what the two model classes do alike: the cache that keeps w
through beam reordering and batch selection (`SequenceRoutingCache`), the decoder model's input
checks and routing resolution (`SequenceRoutedModel`), and the causal LM's routing decision,
logits and `generate` cache (`SequenceRoutedCausalLM`). A class using the mixins sets
`cache_class`, and its config has `model_type`, `num_experts`, `num_experts_per_tok` and (for
perplexity routing) `routing_temperature`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from moefuse.errors import MoeInputError

NLL_CHUNK_LOGITS = 1 << 25  # logits held at once while scoring perplexity (128 MiB in fp32)


def perplexity_routing(perplexities: torch.Tensor, num_experts_per_tok: int, temperature: float) -> torch.Tensor:
    """Routing weights from per-sequence expert perplexities.

    s = 1 / perplexities [batch, E]; the K largest s of a row get softmax(s_topK / temperature),
    the others 0. Rows with a NaN perplexity (fewer than 2 real tokens) get 1/E everywhere.
    Returns fp32 [batch, E], rows summing to 1.
    """
    perplexities = perplexities.float()
    num_experts = perplexities.shape[1]
    unscored = torch.isnan(perplexities).any(dim=1)
    scores = torch.nan_to_num(perplexities.reciprocal(), nan=0.0)
    top, index = scores.topk(num_experts_per_tok, dim=1)
    weights = torch.zeros_like(scores).scatter(1, index, torch.softmax(top / temperature, dim=1))
    return torch.where(unscored[:, None], torch.full_like(weights, 1.0 / num_experts), weights)


def next_token_nll(
    lm_head: nn.Linear, hidden: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor
) -> torch.Tensor:
    """NLL of token t+1 from position t under logits = lm_head(hidden), 0 where not `scored`: fp32
    [batch, length-1]. The logits are formed a few positions at a time (at most NLL_CHUNK_LOGITS
    of them at once)."""
    batch, pairs = scored.shape
    step = max(1, NLL_CHUNK_LOGITS // max(1, batch * lm_head.out_features))
    pieces = []
    for start in range(0, pairs, step):
        stop = min(start + step, pairs)
        logits = lm_head(hidden[:, start:stop]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, start + 1 : stop + 1], reduction="none")
        pieces.append(torch.where(scored[:, start:stop], nll, torch.zeros_like(nll)))
    return torch.cat(pieces, dim=1) if pieces else hidden.new_zeros(batch, 0, dtype=torch.float32)


def perplexity_per_expert(
    expert_hidden: Callable[[int], Tuple[torch.Tensor, nn.Linear]],
    num_experts: int,
    input_ids: torch.LongTensor,
    attention_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """PPL_e = exp(sum of NLL_e over the scored pairs / their count), a pair (t, t+1) scored when
    both tokens are real (attention_mask 1). `expert_hidden(e)` gives expert e's final hidden
    states [batch, T, d] and the head whose logits score them. fp32 [batch, E]; NaN for
    sequences with fewer than 2 real tokens."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    scored = real[:, :-1] & real[:, 1:]
    count = scored.sum(dim=1)
    perplexities = []
    for e in range(num_experts):
        hidden, head = expert_hidden(e)
        nll = next_token_nll(head, hidden, input_ids, scored)
        perplexities.append(torch.exp(nll.sum(dim=1) / count))
    return torch.stack(perplexities, dim=1)


def one_hot_routing(expert: int, batch: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """Routing weights that send every sequence to `expert` alone: fp32 [batch, num_experts]."""
    return F.one_hot(torch.full((batch,), expert, device=device), num_experts).float()


def check_routing_weights(weights: torch.Tensor, batch: int, num_experts: int) -> None:
    """Raise unless `weights` is a finite, nonnegative [batch, num_experts] tensor with rows summing to 1."""
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (batch, num_experts):
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise MoeInputError(
            f"moefuse_moe: routing_weights must be a tensor of shape [batch={batch}, num_experts={num_experts}], "
            f"got {shape}"
        )
    weights = weights.float()
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise MoeInputError("moefuse_moe: routing_weights must be finite and >= 0")
    sums = weights.sum(dim=1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise MoeInputError(f"moefuse_moe: each row of routing_weights must sum to 1, got row sums {sums.tolist()}")


def mix_expert_outputs(outputs: Sequence[torch.Tensor], weights: torch.Tensor, experts: Sequence[int]) -> torch.Tensor:
    """sum_e weights[:, e] * outputs_e, accumulated in fp32, in the outputs' dtype."""
    total = None
    for output, e in zip(outputs, experts):
        term = weights[:, e, None, None].float() * output.float()
        total = term if total is None else total + term
    return total.to(outputs[0].dtype)


def active_experts(weights: torch.Tensor) -> List[int]:
    """The experts with a nonzero weight for some sequence of the batch (the ones that run)."""
    return torch.nonzero(weights.gt(0).any(dim=0)).flatten().tolist()


class SequenceRoutingCache(DynamicCache):
    """A KV cache made of `layers` that also keeps the routing weights [batch, E] of its sequences,
    set at prefill; they follow the batch through beam reordering, repetition and selection."""

    def __init__(self, layers: List[CacheLayerMixin]):
        Cache.__init__(self, layers=layers)
        self.routing_weights: Optional[torch.Tensor] = None

    def reset(self) -> None:
        super().reset()
        self.routing_weights = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.routing_weights is not None:
            self.routing_weights = self.routing_weights.index_select(0, beam_idx.to(self.routing_weights.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.routing_weights is not None:
            self.routing_weights = self.routing_weights.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.routing_weights is not None:
            self.routing_weights = self.routing_weights[indices]


@dataclass
class RoutedInputs:
    """What a routed decoder forward runs on: the embedded input [batch, T, D], the cache (None
    without caching), whether to cache, the positions [1, T] (or as given), the routing weights
    fp32 [batch, E] and the experts that run (a nonzero weight for some sequence)."""

    inputs_embeds: torch.Tensor
    cache: Optional[Cache]
    use_cache: bool
    position_ids: torch.Tensor
    weights: torch.Tensor
    active: List[int]


class SequenceRoutedModel:
    """Mixin of a decoder model (before `PreTrainedModel` in the bases) that embeds with
    `embed_tokens`, runs with routing weights [batch, E] and keeps them in a `cache_class` cache.
    `routing_hint` names what routes a prompt (for the error when no weights are known)."""

    cache_class: type
    routing_hint: str

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _routed_inputs(self, input_ids, inputs_embeds, cache, use_cache, position_ids, routing_weights) -> RoutedInputs:
        """The checked inputs of a forward: the embedded input, the cache (a new one when caching
        without one), positions past_length + [0, T) unless given (past_length: the tokens the
        cache holds), and the routing weights (`_resolve_routing`)."""
        name = self.config.model_type
        if (input_ids is None) == (inputs_embeds is None):
            raise MoeInputError(f"{name}: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.cache_class(self.config)
        if cache is not None and not isinstance(cache, self.cache_class):
            kind = self.cache_class.__name__
            raise MoeInputError(f"{name}: cache must be a {kind} ({kind}(model.config)), got {type(cache).__name__}")
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length)[None]
        weights = self._resolve_routing(routing_weights, cache, past_length, inputs_embeds.shape[0])
        return RoutedInputs(inputs_embeds, cache, use_cache, position_ids, weights, active_experts(weights))

    def _resolve_routing(self, routing_weights, cache, past_length: int, batch: int) -> torch.Tensor:
        """The weights of this call: explicit ones, else the cache's; stored in an empty cache."""
        if routing_weights is None:
            routing_weights = cache.routing_weights if cache is not None else None
            if routing_weights is None:
                raise MoeInputError(
                    f"{self.config.model_type}: no routing weights: pass routing_weights=[batch, num_experts], or "
                    f"call {self.routing_hint} on the whole prompt first"
                )
        check_routing_weights(routing_weights, batch, self.config.num_experts)
        if cache is not None and past_length == 0:
            cache.routing_weights = routing_weights.float()
        return routing_weights.float()


class SequenceRoutedCausalLM:
    """Mixin of a causal LM (before its `PreTrainedModel` in the bases, `GenerationMixin` after)
    made of a `SequenceRoutedModel` `model` and a head `lm_head`, caching in `cache_class`."""

    cache_class: type

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _routed_alone(self, expert: int, input_ids, attention_mask, position_ids) -> Tuple[torch.Tensor, nn.Linear]:
        """The final hidden states of the model routed one-hot on `expert` (no cache), and `lm_head`."""
        weights = one_hot_routing(expert, input_ids.shape[0], self.config.num_experts, input_ids.device)
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            routing_weights=weights,
        ).last_hidden_state
        return hidden, self.lm_head

    def _perplexity_routing(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """`perplexity_routing` of `expert_perplexities` with the config's K and temperature: fp32 [batch, E]."""
        return perplexity_routing(
            self.expert_perplexities(input_ids, attention_mask, position_ids),
            self.config.num_experts_per_tok,
            self.config.routing_temperature,
        )

    def _must_route(self, routing_weights: Optional[torch.Tensor], cache: Optional[Cache]) -> bool:
        """Whether this call has to route its input: no weights given and none kept in `cache`.
        Raises when `cache` already holds tokens but no weights."""
        cached = cache.routing_weights if isinstance(cache, self.cache_class) else None
        if routing_weights is not None or cached is not None:
            return False
        if cache is not None and cache.get_seq_length() > 0:
            raise MoeInputError(
                f"{self.config.model_type}: the cache holds tokens but no routing weights; pass routing_weights= or "
                f"start from an empty {self.cache_class.__name__}"
            )
        return True

    def _run_and_score(self, model_inputs: dict, labels, logits_to_keep, vocab_size: int, **kwargs):
        """(outputs, logits, loss): outputs = model(**model_inputs, **kwargs); logits =
        lm_head(last_hidden_state) at the last `logits_to_keep` positions (all when 0) or at the
        given indices; the LM loss of the logits against `labels` (None without labels)."""
        outputs = self.model(**model_inputs, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return outputs, logits, loss

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`generate` gets a `cache_class` cache (the dense families' static or quantized caches do
        not know the expert layers)."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise MoeInputError(
                f"{self.config.model_type}: cache_implementation={generation_config.cache_implementation!r} is not "
                "supported; use the default dynamic cache"
            )
        model_kwargs["cache"] = self.cache_class(self.config)
