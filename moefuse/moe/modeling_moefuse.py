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
from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from moefuse.moe import auto_registration
from moefuse.errors import MoeInputError
from moefuse.moe.configuration_moefuse import MoefuseMoeConfig
from moefuse.moe.sequence_routing import (
    SequenceRoutedCausalLM,
    SequenceRoutedModel,
    SequenceRoutingCache,
    mix_expert_outputs,
    perplexity_per_expert,
    perplexity_routing,
)

MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}
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


class MoefuseCache(SequenceRoutingCache):
    """KV cache of a `moefuse_moe` model, and the routing weights of its sequences.

    Holds one cache layer per attention: index l*E + e for (layer l, expert e) with separate
    attention, l with shared attention. `routing_weights` [batch, E] is set at prefill and follows
    the batch through beam reordering, repetition and selection.
    """

    def __init__(self, config: MoefuseMoeConfig):
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.base_config)
        self.attentions_per_layer = config.num_experts if config.separate_attention else 1
        super().__init__(
            layers=[
                DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs)
                for layer_type, kwargs in zip(layer_types, layer_kwargs)
                for _ in range(self.attentions_per_layer)
            ]
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by decoder layer `layer_idx // attentions_per_layer` (its experts that ran)."""
        first = layer_idx - layer_idx % self.attentions_per_layer
        group = self.layers[first : first + self.attentions_per_layer]
        return max((layer.get_seq_length() for layer in group), default=0)


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


class MoefuseMoeModel(SequenceRoutedModel, MoefuseMoePreTrainedModel):
    """The decoder stack; needs routing weights (explicit, or kept in a `MoefuseCache`). Use
    `MoefuseMoeForCausalLM` for perplexity routing."""

    cache_class = MoefuseCache
    routing_hint = "MoefuseMoeForCausalLM (perplexity routing)"

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
        run = self._routed_inputs(input_ids, inputs_embeds, cache, use_cache, position_ids, routing_weights)
        masks = self._masks(run.inputs_embeds, attention_mask, run.cache, run.position_ids, run.active[0])
        position_embeddings = self.rotary_emb(run.inputs_embeds, run.position_ids)

        hidden_states = run.inputs_embeds
        for layer, layer_type in zip(self.layers, self.layer_types):
            hidden_states = layer(
                hidden_states,
                run.weights,
                run.active,
                attention_mask=masks[layer_type],
                position_ids=run.position_ids,
                cache=run.cache,
                use_cache=run.use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return MoefuseMoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            cache=run.cache if run.use_cache else None,
            routing_weights=run.weights,
        )

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


class MoefuseMoeForCausalLM(SequenceRoutedCausalLM, MoefuseMoePreTrainedModel, GenerationMixin):
    """`MoefuseMoeModel` + the language-model head, with perplexity routing (see the module docstring)."""

    cache_class = MoefuseCache
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoefuseMoeConfig):
        super().__init__(config)
        base = config.base_config
        self.model = MoefuseMoeModel(config)
        self.lm_head = nn.Linear(base.hidden_size, base.vocab_size, bias=False)
        self.post_init()
        # special tokens (bos, eos, pad) live in the dense config
        self.generation_config = GenerationConfig.from_model_config(base)

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
        return perplexity_per_expert(
            lambda e: self._routed_alone(e, input_ids, attention_mask, position_ids),
            self.config.num_experts,
            input_ids,
            attention_mask,
        )

    def route(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        """Perplexity routing weights of each sequence, fp32 [batch, E] (see `perplexity_routing`)."""
        return self._perplexity_routing(input_ids, attention_mask, position_ids)

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
        if self._must_route(routing_weights, cache):
            if input_ids is None:
                raise MoeInputError("moefuse_moe: perplexity routing needs input_ids; or pass routing_weights=")
            routing_weights = self.route(input_ids, attention_mask, position_ids)
        model_inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, routing_weights=routing_weights,
        )
        vocab_size = self.config.base_config.vocab_size
        outputs, logits, loss = self._run_and_score(model_inputs, labels, logits_to_keep, vocab_size, **kwargs)
        return MoefuseMoeCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, routing_weights=outputs.routing_weights
        )


__all__ = [
    "MoefuseCache",
    "MoefuseMoeConfig",
    "MoefuseMoeForCausalLM",
    "MoefuseMoeModel",
    "MoefuseMoePreTrainedModel",
    "dense_family",
    "mix_expert_outputs",
    "perplexity_routing",
]


auto_registration.register_when_loaded(__name__)  # see auto_registration.register_models
