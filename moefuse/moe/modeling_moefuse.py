"""The `moefuse_moe` model class: MergeME's no-fine-tuning MoE (arXiv 2502.00997), which transformers lacks.

E dense decoders of one family (llama, mistral, qwen2, qwen3) share the embedding, final norm and
head. Per decoder layer l, with routing weights w [batch, E] (one row per sequence, summing to 1):
    separate_attention=True:  out = sum_e w_e * DecoderLayer_{l,e}(h)   (the family's own layer)
    separate_attention=False: h' = h + Attn_l(norm1_l(h)); out = h' + sum_e w_e * FFN_{l,e}(norm2_l(h'))
Only experts with a nonzero weight for some sequence of the batch run.

Perplexity routing (the default): on the first forward of a sequence (prefill, or every forward when
no cache is used) each expert e scores the input alone (routing one-hot on e):
    PPL_e = exp(mean next-token NLL over the real tokens), s_e = 1 / PPL_e,
    w = softmax(s_topK / routing_temperature) on the K best experts, 0 elsewhere.
A sequence with fewer than 2 real tokens has no next-token NLL: it gets w_e = 1/E for every expert.
With a `MoefuseCache` (what `generate` uses) the prefill weights are kept for the sequence.
`routing_weights=` [batch, E] passed to forward overrides the routing.

Checkpoint tensor names: `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` (absent
when tied), and per layer l either `model.layers.{l}.experts.{e}.<dense decoder layer keys>`
(separate attention) or `model.layers.{l}.{self_attn.*, input_layernorm.weight,
post_attention_layernorm.weight}` + `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicCache, get_layer_types_and_kwargs
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from moefuse.errors import MoeInputError
from moefuse.moe.configuration_moefuse import MoefuseMoeConfig

MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}
NLL_CHUNK_LOGITS = 1 << 25  # logits held at once while scoring perplexity (128 MiB in fp32)
_FAMILY_PARTS = {
    "decoder_layer": "DecoderLayer",
    "attention": "Attention",
    "mlp": "MLP",
    "norm": "RMSNorm",
    "rotary": "RotaryEmbedding",
}


@dataclass(frozen=True)
class DenseFamily:
    """The dense family's own module classes (e.g. LlamaDecoderLayer, LlamaAttention, LlamaMLP,
    LlamaRMSNorm, LlamaRotaryEmbedding), found next to its base model class."""

    decoder_layer: type
    attention: type
    mlp: type
    norm: type
    rotary: type


def dense_family(base_config) -> DenseFamily:
    """Look up the module classes of `base_config`'s family in its transformers modeling module."""
    model_class = MODEL_MAPPING[type(base_config)]
    module = sys.modules[model_class.__module__]
    prefix = model_class.__name__.removesuffix("Model")
    parts = {field: getattr(module, prefix + suffix, None) for field, suffix in _FAMILY_PARTS.items()}
    missing = [prefix + _FAMILY_PARTS[field] for field, cls in parts.items() if cls is None]
    if missing:
        raise MoeInputError(
            f"moefuse_moe: transformers' {module.__name__} lacks {', '.join(missing)}; "
            f"this transformers version does not fit the {base_config.model_type!r} family"
        )
    return DenseFamily(**parts)


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


class MoefuseCache(DynamicCache):
    """KV cache of a `moefuse_moe` model, and the routing weights of its sequences.

    Holds one cache layer per attention: index l*E + e for (layer l, expert e) with separate
    attention, l with shared attention. `routing_weights` [batch, E] is set at prefill and follows
    the batch through beam reordering, repetition and selection.
    """

    def __init__(self, config: MoefuseMoeConfig):
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.base_config)
        self.attentions_per_layer = config.num_experts if config.separate_attention else 1
        layers = [
            DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs)
            for layer_type, kwargs in zip(layer_types, layer_kwargs)
            for _ in range(self.attentions_per_layer)
        ]
        Cache.__init__(self, layers=layers)
        self.routing_weights: Optional[torch.Tensor] = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by decoder layer `layer_idx // attentions_per_layer` (its experts that ran)."""
        first = layer_idx - layer_idx % self.attentions_per_layer
        group = self.layers[first : first + self.attentions_per_layer]
        return max((layer.get_seq_length() for layer in group), default=0)

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


def mix_expert_outputs(outputs: Sequence[torch.Tensor], weights: torch.Tensor, experts: Sequence[int]) -> torch.Tensor:
    """sum_e weights[:, e] * outputs_e, accumulated in fp32, in the outputs' dtype."""
    total = None
    for output, e in zip(outputs, experts):
        term = weights[:, e, None, None].float() * output.float()
        total = term if total is None else total + term
    return total.to(outputs[0].dtype)


class MoefuseExpertFFNs(nn.Module):
    """E SwiGLU FFNs of the family (`experts.{e}.{gate,up,down}_proj`): sum_e w_e * FFN_e(x)."""

    def __init__(self, family: DenseFamily, base_config, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList([family.mlp(base_config) for _ in range(num_experts)])

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor, active: Sequence[int]) -> torch.Tensor:
        return mix_expert_outputs([self.experts[e](x) for e in active], routing_weights, active)


class MoefuseSharedAttentionLayer(nn.Module):
    """Shared attention and norms, expert FFNs:
    h' = h + Attn(norm1(h)); out = h' + sum_e w_e * FFN_e(norm2(h'))."""

    def __init__(self, family: DenseFamily, base_config, layer_idx: int, num_experts: int):
        super().__init__()
        self.self_attn = family.attention(config=base_config, layer_idx=layer_idx)
        self.mlp = MoefuseExpertFFNs(family, base_config, num_experts)
        self.input_layernorm = family.norm(base_config.hidden_size, eps=base_config.rms_norm_eps)
        self.post_attention_layernorm = family.norm(base_config.hidden_size, eps=base_config.rms_norm_eps)

    def forward(self, hidden_states, routing_weights, active, **layer_kwargs) -> torch.Tensor:
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **layer_kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), routing_weights, active)


class MoefuseSeparateAttentionLayer(nn.Module):
    """E whole decoder layers of the family (`experts.{e}.*`): out = sum_e w_e * DecoderLayer_e(h).
    Expert e of layer l caches its keys and values in slot l*E + e."""

    def __init__(self, family: DenseFamily, base_config, layer_idx: int, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList()
        for e in range(num_experts):
            layer = family.decoder_layer(base_config, layer_idx)
            layer.self_attn.layer_idx = layer_idx * num_experts + e
            self.experts.append(layer)

    def forward(self, hidden_states, routing_weights, active, **layer_kwargs) -> torch.Tensor:
        outputs = [self.experts[e](hidden_states, **layer_kwargs) for e in active]
        return mix_expert_outputs(outputs, routing_weights, active)


@dataclass
class MoefuseMoeModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the routing weights used, fp32 [batch, E]."""

    routing_weights: Optional[torch.FloatTensor] = None


@dataclass
class MoefuseMoeCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the routing weights used, fp32 [batch, E]."""

    routing_weights: Optional[torch.FloatTensor] = None


class MoefuseMoePreTrainedModel(PreTrainedModel):
    config: MoefuseMoeConfig
    config_class = MoefuseMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoefuseSeparateAttentionLayer", "MoefuseSharedAttentionLayer"]
    _supports_sdpa = True


class MoefuseMoeModel(MoefuseMoePreTrainedModel):
    """The decoder stack; needs routing weights (explicit, or kept in a `MoefuseCache`). Use
    `MoefuseMoeForCausalLM` for perplexity routing."""

    def __init__(self, config: MoefuseMoeConfig):
        super().__init__(config)
        base = config.base_config
        base._attn_implementation_internal = config._attn_implementation
        family = dense_family(base)
        layer_class = MoefuseSeparateAttentionLayer if config.separate_attention else MoefuseSharedAttentionLayer
        self.embed_tokens = nn.Embedding(base.vocab_size, base.hidden_size, base.pad_token_id)
        self.layers = nn.ModuleList(
            [layer_class(family, base, layer_idx, config.num_experts) for layer_idx in range(base.num_hidden_layers)]
        )
        self.norm = family.norm(base.hidden_size, eps=base.rms_norm_eps)
        self.rotary_emb = family.rotary(config=base)
        self.layer_types = get_layer_types_and_kwargs(base)[0]
        unsupported = sorted(set(self.layer_types) - set(MASK_FUNCTIONS))
        if unsupported:
            raise MoeInputError(
                f"moefuse_moe: base layer types {unsupported} are not supported; supported: {sorted(MASK_FUNCTIONS)}"
            )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        routing_weights: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> MoefuseMoeModelOutputWithPast:
        """Run the decoder stack with `routing_weights` [batch, E] (default: the ones kept in `cache`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise MoeInputError("moefuse_moe: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = MoefuseCache(self.config)
        if cache is not None and not isinstance(cache, MoefuseCache):
            raise MoeInputError(
                f"moefuse_moe: cache must be a MoefuseCache (MoefuseCache(model.config)), got {type(cache).__name__}"
            )
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0)

        weights = self._resolve_routing(routing_weights, cache, past_length, inputs_embeds.shape[0])
        active = torch.nonzero(weights.gt(0).any(dim=0)).flatten().tolist()
        masks = self._masks(inputs_embeds, attention_mask, cache, position_ids, active[0])
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        for layer, layer_type in zip(self.layers, self.layer_types):
            hidden_states = layer(
                hidden_states,
                weights,
                active,
                attention_mask=masks[layer_type],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return MoefuseMoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            cache=cache if use_cache else None,
            routing_weights=weights,
        )

    def _resolve_routing(self, routing_weights, cache, past_length: int, batch: int) -> torch.Tensor:
        """The weights of this call: explicit ones, else the cache's; stored in an empty cache."""
        if routing_weights is None:
            routing_weights = cache.routing_weights if cache is not None else None
            if routing_weights is None:
                raise MoeInputError(
                    "moefuse_moe: no routing weights: pass routing_weights=[batch, num_experts], or call "
                    "MoefuseMoeForCausalLM (perplexity routing) on the whole prompt first"
                )
        check_routing_weights(routing_weights, batch, self.config.num_experts)
        if cache is not None and past_length == 0:
            cache.routing_weights = routing_weights.float()
        return routing_weights.float()

    def _masks(self, inputs_embeds, attention_mask, cache, position_ids, expert: int) -> Dict[str, torch.Tensor]:
        """One attention mask per base layer type, sized against the cache slot of the first layer of
        that type and an expert that runs (skipped experts' slots stay empty)."""
        per_layer = self.config.num_experts if self.config.separate_attention else 1
        masks = {}
        for layer_type in set(self.layer_types):
            slot = self.layer_types.index(layer_type) * per_layer + (expert if per_layer > 1 else 0)
            masks[layer_type] = MASK_FUNCTIONS[layer_type](
                config=self.config.base_config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=slot,
            )
        return masks


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


class MoefuseMoeForCausalLM(MoefuseMoePreTrainedModel, GenerationMixin):
    """`MoefuseMoeModel` + the language-model head, with perplexity routing (see the module docstring)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoefuseMoeConfig):
        super().__init__(config)
        base = config.base_config
        self.model = MoefuseMoeModel(config)
        self.lm_head = nn.Linear(base.hidden_size, base.vocab_size, bias=False)
        self.post_init()
        # special tokens (bos, eos, pad) live in the dense config
        self.generation_config = GenerationConfig.from_model_config(base)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def expert_perplexities(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        """PPL_e = exp(mean NLL of token t+1 given tokens <= t, over pairs where both are real
        (attention_mask 1)), with each expert alone (routing one-hot on e). fp32 [batch, E];
        NaN for sequences with fewer than 2 real tokens."""
        batch = input_ids.shape[0]
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        scored = real[:, :-1] & real[:, 1:]
        count = scored.sum(dim=1)
        perplexities = []
        for e in range(self.config.num_experts):
            one_hot = F.one_hot(torch.full((batch,), e, device=input_ids.device), self.config.num_experts).float()
            hidden = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                routing_weights=one_hot,
            ).last_hidden_state
            nll = next_token_nll(self.lm_head, hidden, input_ids, scored)
            perplexities.append(torch.exp(nll.sum(dim=1) / count))
        return torch.stack(perplexities, dim=1)

    def route(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        """Perplexity routing weights of each sequence, fp32 [batch, E] (see `perplexity_routing`)."""
        return perplexity_routing(
            self.expert_perplexities(input_ids, attention_mask, position_ids),
            self.config.num_experts_per_tok,
            self.config.routing_temperature,
        )

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        routing_weights: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> MoefuseMoeCausalLMOutputWithPast:
        """Logits of the routed mixture. Routing: `routing_weights` [batch, E] if given, else the
        weights kept in `cache`, else perplexity routing on this call's input_ids (kept in `cache`)."""
        cached = cache.routing_weights if isinstance(cache, MoefuseCache) else None
        if routing_weights is None and cached is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise MoeInputError(
                    "moefuse_moe: the cache holds tokens but no routing weights; pass routing_weights= or start "
                    "from an empty MoefuseCache"
                )
            if input_ids is None:
                raise MoeInputError("moefuse_moe: perplexity routing needs input_ids; or pass routing_weights=")
            routing_weights = self.route(input_ids, attention_mask, position_ids)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routing_weights=routing_weights,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.base_config.vocab_size, **kwargs
            )
        return MoefuseMoeCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, routing_weights=outputs.routing_weights
        )

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`generate` gets a `MoefuseCache` (the dense families' static or quantized caches do not know
        the expert layers)."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise MoeInputError(
                f"moefuse_moe: cache_implementation={generation_config.cache_implementation!r} is not supported; "
                "use the default dynamic cache"
            )
        model_kwargs["cache"] = MoefuseCache(self.config)


__all__ = [
    "MoefuseCache",
    "MoefuseMoeConfig",
    "MoefuseMoeForCausalLM",
    "MoefuseMoeModel",
    "MoefuseMoePreTrainedModel",
    "check_routing_weights",
    "dense_family",
    "mix_expert_outputs",
    "next_token_nll",
    "perplexity_routing",
]
