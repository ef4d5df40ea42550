"""The `moefuse_hetero` model class: MergeME's heterogeneous MoE (arXiv 2502.00997).

E whole dense causal LMs of any families, widths d_e and depths share one tokenizer. With the
shared embedding table Emb [V, D] (D >= every d_e), the shared head H [V, D], and per expert an
in-projector P_in_e: R^D -> R^{d_e} and an out-projector P_out_e: R^{d_e} -> R^D:
    x       = Emb[tokens]                                   [batch, T, D]
    z_e     = Stack_e(P_in_e(x))                            expert e's own decoder layers, rotary
                                                            embedding and final norm, [batch, T, d_e]
    h       = sum_e w_e * P_out_e(z_e)                      mixing in the shared space, [batch, T, D]
    logits  = H h                                           [batch, T, V]
so the mixture is of each expert's final (normed) hidden state, mapped back to the shared width,
before the shared head. Only experts with a nonzero weight for some sequence of the batch run.
A projector is P(x) = W x ("linear") or W x + W_down silu(W_up x) ("mlp"); at initialization W is
the selection [I_{d_e} | 0] (in) or the zero-padding [I_{d_e}; 0] (out) and W_down = 0, so with
Emb and H equal to expert e's own (zero-padded) tables, routing one-hot on e reproduces expert e.

Routing is per sequence, decided on the first forward (prefill) and kept in the `MoefuseHeteroCache`:
    learned:    r = W_router m, m = mean of x over the real tokens (attention_mask 1);
                w = softmax(r_topK) on the K largest logits, 0 elsewhere.
    perplexity: MergeME's no-fine-tuning heuristic: PPL_e of dense expert e (its own tables kept
                with `expert_tables`; otherwise of the model routed one-hot on e),
                w = softmax((1 / PPL)_topK / T) (`perplexity_routing`).
`routing_weights=` [batch, E] passed to forward overrides the routing.

Checkpoint tensor names: `model.embed_tokens.weight` [V, D], `model.router.weight` [E, D],
`model.projectors_in.{e}.{weight,up_weight,down_weight}`, `model.projectors_out.{e}.<same>`,
`model.experts.{e}.<the dense model's base-model keys without embed_tokens>` (e.g.
`model.experts.1.layers.0.self_attn.q_proj.weight`, `model.experts.1.norm.weight`), `lm_head.weight` [V, D];
with `expert_tables` also `model.experts.{e}.embed_tokens.weight` and `expert_heads.{e}.weight` [V_e, d_e].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from moefuse.moe import auto_registration
from moefuse.errors import MoeInputError
from moefuse.moe.configuration_hetero import MoefuseHeteroConfig
from moefuse.moe.sequence_routing import (
    SequenceRoutedCausalLM,
    SequenceRoutedModel,
    SequenceRoutingCache,
    mix_expert_outputs,
    perplexity_per_expert,
)


def learned_routing(router_logits: torch.Tensor, num_experts_per_tok: int) -> torch.Tensor:
    """w = softmax over the K largest router logits of each row, 0 elsewhere: fp32 [batch, E]
    (equal to the top-K of softmax(r), renormalized to sum 1)."""
    logits = router_logits.float()
    top, index = logits.topk(num_experts_per_tok, dim=1)
    return torch.zeros_like(logits).scatter(1, index, torch.softmax(top, dim=1))


def sequence_load_balancing_loss(router_logits: torch.Tensor, num_experts_per_tok: int) -> torch.Tensor:
    """The Switch/Mixtral load-balancing loss over sequences: E * sum_e f_e * P_e, with f_e the
    fraction of the batch's B*K (sequence, slot) routings that go to expert e and P_e the mean of
    softmax(r)_e over the batch. 1 when balanced; gradients flow through P only."""
    probabilities = torch.softmax(router_logits.float(), dim=1)
    num_experts = probabilities.shape[1]
    chosen = router_logits.topk(num_experts_per_tok, dim=1).indices
    fraction = F.one_hot(chosen, num_experts).float().sum(dim=1).mean(dim=0) / num_experts_per_tok
    return num_experts * (fraction * probabilities.mean(dim=0)).sum()


class HeteroProjector(nn.Module):
    """P(x) = W x ("linear"), or W x + W_down silu(W_up x) ("mlp"), with `weight` W [d_out, d_in],
    `up_weight` W_up [hidden, d_in] and `down_weight` W_down [d_out, hidden]."""

    def __init__(self, d_in: int, d_out: int, kind: str, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.up_weight = nn.Parameter(torch.empty(hidden, d_in)) if kind == "mlp" else None
        self.down_weight = nn.Parameter(torch.empty(d_out, hidden)) if kind == "mlp" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.up_weight is not None:
            y = y + F.linear(F.silu(F.linear(x, self.up_weight)), self.down_weight)
        return y


class MoefuseHeteroCache(SequenceRoutingCache):
    """KV cache of a `moefuse_hetero` model: one `DynamicCache` per expert (`experts[e]`, sized by
    expert e's own config), whose layers are also this cache's `layers` (so beam reordering and
    batch selection reach them), and the routing weights [batch, E] kept since prefill."""

    def __init__(self, config: MoefuseHeteroConfig):
        self.experts: List[DynamicCache] = [
            DynamicCache(config=config.expert_config(e)) for e in range(config.num_experts)
        ]
        super().__init__(layers=[layer for cache in self.experts for layer in cache.layers])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by the experts that ran (skipped experts' caches stay empty)."""
        return max((cache.get_seq_length() for cache in self.experts), default=0)


@dataclass
class MoefuseHeteroModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` (last_hidden_state: the mixture h, [batch, T, D]) plus the routing
    weights used, fp32 [batch, E]."""

    routing_weights: Optional[torch.FloatTensor] = None


@dataclass
class MoefuseHeteroCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the routing weights used, fp32 [batch, E], and the learned
    router's logits [batch, E] when this call computed them (for the load-balancing loss)."""

    routing_weights: Optional[torch.FloatTensor] = None
    router_logits: Optional[torch.FloatTensor] = None


class MoefuseHeteroPreTrainedModel(PreTrainedModel):
    config: MoefuseHeteroConfig
    config_class = MoefuseHeteroConfig
    base_model_prefix = "model"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Projectors start exact (W a selection / zero-padding, W_down = 0); the rest as transformers does."""
        if isinstance(module, HeteroProjector):
            init.eye_(module.weight)
            if module.up_weight is not None:
                init.normal_(module.up_weight, std=0.02)
                init.zeros_(module.down_weight)
        else:
            super()._init_weights(module)


class MoefuseHeteroModel(SequenceRoutedModel, MoefuseHeteroPreTrainedModel):
    """Shared embedding, router, projectors and the experts' decoder stacks; forward needs routing
    weights (explicit, or kept in a `MoefuseHeteroCache`). Use `MoefuseHeteroForCausalLM` to route.
    With `expert_tables`, `experts[e]` keeps its own `embed_tokens` (for perplexity scoring only)."""

    cache_class = MoefuseHeteroCache
    routing_hint = "MoefuseHeteroForCausalLM"

    def __init__(self, config: MoefuseHeteroConfig):
        super().__init__(config)
        width = config.hidden_size
        hidden = config.projector_hidden_size or width
        self.embed_tokens = nn.Embedding(config.vocab_size, width)
        self.router = nn.Linear(width, config.num_experts, bias=False)
        self.experts = nn.ModuleList()
        self.projectors_in = nn.ModuleList()
        self.projectors_out = nn.ModuleList()
        for e in range(config.num_experts):
            expert_config = config.expert_config(e)
            expert_config._attn_implementation_internal = config._attn_implementation
            expert = MODEL_MAPPING[type(expert_config)](expert_config)
            if not isinstance(getattr(expert, "embed_tokens", None), nn.Embedding):
                raise MoeInputError(
                    f"moefuse_hetero: expert {e}'s base model {type(expert).__name__} has no embed_tokens; only "
                    "decoder-only families with model.embed_tokens (llama, mistral, qwen2, qwen3, ...) are supported"
                )
            if not config.expert_tables:
                expert.embed_tokens = None  # inputs come from the shared embedding through the in-projector
            self.experts.append(expert)
            self.projectors_in.append(HeteroProjector(width, expert_config.hidden_size, config.projector, hidden))
            self.projectors_out.append(HeteroProjector(expert_config.hidden_size, width, config.projector, hidden))
        self.post_init()
        for expert in self.experts:  # post_init gathers these from direct children only (device_map, dtypes)
            self._no_split_modules.update(expert._no_split_modules)
            self._keep_in_fp32_modules.update(expert._keep_in_fp32_modules)

    def router_logits(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """r = W_router m, m the mean of `inputs_embeds` over the real tokens: fp32 [batch, E]."""
        if attention_mask is None:
            mean = inputs_embeds.mean(dim=1)
        else:
            if attention_mask.shape != inputs_embeds.shape[:2]:
                raise MoeInputError(
                    f"moefuse_hetero: attention_mask of shape {tuple(attention_mask.shape)} does not match the "
                    f"input [batch, length] = {tuple(inputs_embeds.shape[:2])} at routing (pass a 2-D mask)"
                )
            real = attention_mask.to(inputs_embeds.dtype)[..., None]
            mean = (inputs_embeds * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        return self.router(mean).float()

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
    ) -> MoefuseHeteroModelOutputWithPast:
        """h = sum_e w_e P_out_e(Stack_e(P_in_e(x))) with `routing_weights` [batch, E] (default:
        the ones kept in `cache`)."""
        run = self._routed_inputs(input_ids, inputs_embeds, cache, use_cache, position_ids, routing_weights)
        outputs = []
        for e in run.active:
            hidden = self.experts[e](
                inputs_embeds=self.projectors_in[e](run.inputs_embeds),
                attention_mask=attention_mask,
                position_ids=run.position_ids,
                cache=run.cache.experts[e] if run.cache is not None else None,
                use_cache=run.use_cache,
                **kwargs,
            ).last_hidden_state
            outputs.append(self.projectors_out[e](hidden))
        return MoefuseHeteroModelOutputWithPast(
            last_hidden_state=mix_expert_outputs(outputs, run.weights, run.active),
            cache=run.cache if run.use_cache else None,
            routing_weights=run.weights,
        )


class MoefuseHeteroForCausalLM(SequenceRoutedCausalLM, MoefuseHeteroPreTrainedModel, GenerationMixin):
    """`MoefuseHeteroModel` + the shared language-model head, with sequence-level routing (see the
    module docstring)."""

    cache_class = MoefuseHeteroCache

    def __init__(self, config: MoefuseHeteroConfig):
        super().__init__(config)
        self.model = MoefuseHeteroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.expert_heads = None
        if config.expert_tables:
            shapes = [(c.hidden_size, c.vocab_size) for c in map(config.expert_config, range(config.num_experts))]
            self.expert_heads = nn.ModuleList([nn.Linear(d, v, bias=False) for d, v in shapes])
        self.post_init()
        if config.num_experts:  # special tokens (bos, eos, pad) as the first expert's
            self.generation_config = GenerationConfig.from_model_config(config.expert_config(0))

    @torch.no_grad()
    def expert_perplexities(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        """PPL_e = exp(mean NLL of token t+1 given tokens <= t, over pairs where both are real) of
        dense expert e itself (with `expert_tables`: its own embedding, stack and head), or else of
        the model routed one-hot on e. fp32 [batch, E]; NaN for sequences with fewer than 2 real
        tokens."""

        def dense_expert(e: int):
            hidden = self.model.experts[e](
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
            return hidden, self.expert_heads[e]

        def routed_alone(e: int):
            return self._routed_alone(e, input_ids, attention_mask, position_ids)

        expert_hidden = dense_expert if self.expert_heads is not None else routed_alone
        return perplexity_per_expert(expert_hidden, self.config.num_experts, input_ids, attention_mask)

    def route(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The routing weights of each sequence by `config.routing`, fp32 [batch, E]."""
        if self.config.routing == "perplexity":
            if input_ids is None:
                raise MoeInputError("moefuse_hetero: perplexity routing needs input_ids; or pass routing_weights=")
            return self._perplexity_routing(input_ids, attention_mask, position_ids)
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        router_logits = self.model.router_logits(inputs_embeds, attention_mask)
        return learned_routing(router_logits, self.config.num_experts_per_tok)

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
    ) -> MoefuseHeteroCausalLMOutputWithPast:
        """Logits H h of the routed mixture. Routing: `routing_weights` [batch, E] if given, else the
        weights kept in `cache`, else `config.routing` on this call's input (kept in `cache`)."""
        router_logits = None
        if self._must_route(routing_weights, cache):
            if self.config.routing == "perplexity":
                routing_weights = self.route(input_ids, attention_mask, position_ids)
            else:
                if inputs_embeds is None and input_ids is not None:
                    inputs_embeds, input_ids = self.model.embed_tokens(input_ids), None
                if inputs_embeds is None:
                    raise MoeInputError("moefuse_hetero: pass input_ids or inputs_embeds")
                router_logits = self.model.router_logits(inputs_embeds, attention_mask)
                routing_weights = learned_routing(router_logits, self.config.num_experts_per_tok)
        model_inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, routing_weights=routing_weights,
        )
        vocab_size = self.config.vocab_size
        outputs, logits, loss = self._run_and_score(model_inputs, labels, logits_to_keep, vocab_size, **kwargs)
        return MoefuseHeteroCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, routing_weights=outputs.routing_weights,
            router_logits=router_logits,
        )


__all__ = [
    "HeteroProjector",
    "MoefuseHeteroCache",
    "MoefuseHeteroConfig",
    "MoefuseHeteroForCausalLM",
    "MoefuseHeteroModel",
    "MoefuseHeteroPreTrainedModel",
    "learned_routing",
    "sequence_load_balancing_loss",
]


auto_registration.register_when_loaded(__name__)  # see auto_registration.register_models
