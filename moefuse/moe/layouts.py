"""Output layouts of a homogeneous MoE: which model class, config and tensor names it uses.

Every layout turns the dense FFN of layer l of expert e (`model.layers.{l}.mlp.{gate,up,down}_proj`)
into that layer's expert e and keeps the other tensors under their dense names. Expert tensors are
written per expert in the layout transformers itself saves (and converts to fused 3-D weights on
load), so a tensor is copied, never concatenated in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import transformers

from moefuse.moe.config import MoeBuildConfig, MoeConfigError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DROP_CONFIG_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "quantization_config")
MOEFUSE_MODEL_TYPE = "moefuse_moe"


@dataclass(frozen=True)
class Layout:
    name: str                      # what `architecture:` matches (by prefix, as mergekit-moe)
    input_types: Tuple[str, ...]   # dense model_types it accepts
    shared_experts: int            # how many shared experts it needs
    make_config: Callable[[dict, MoeBuildConfig], dict]
    expert_names: Callable[[int, int, str], str]  # (layer, expert, dense key within the layer) -> key
    router_name: Optional[Callable[[int], str]] = None
    shared_expert_names: Optional[Callable[[int, str], str]] = None  # (layer, dense key within the layer)
    shared_gate_name: Optional[Callable[[int], str]] = None
    zero_attention_bias: bool = False  # add the q/k/v biases the class has when inputs lack them

    def dense_layer_tensor(self, key: str) -> bool:
        """Whether `key` belongs to a layer's FFN (and so becomes an expert tensor)."""
        return ".mlp." in key


def _dense(base: dict) -> dict:
    return {k: v for k, v in base.items() if k not in DROP_CONFIG_KEYS}


def _finish(config: transformers.PretrainedConfig, architecture: str) -> dict:
    config.architectures = [architecture]
    return config.to_dict()


def _mixtral_config(base: dict, cfg: MoeBuildConfig) -> dict:
    config = transformers.MixtralConfig(**_dense(base))
    config.num_local_experts = len(cfg.experts)
    config.num_experts_per_tok = cfg.experts_per_token
    config.sliding_window = None
    return _finish(config, "MixtralForCausalLM")


def _qwen_moe_fields(config, cfg: MoeBuildConfig) -> None:
    config.num_experts = len(cfg.experts)
    config.num_experts_per_tok = cfg.experts_per_token
    config.decoder_sparse_step = 1
    config.mlp_only_layers = []
    config.norm_topk_prob = True
    config.moe_intermediate_size = config.intermediate_size


def _qwen2_moe_config(base: dict, cfg: MoeBuildConfig) -> dict:
    config = transformers.Qwen2MoeConfig(**_dense(base))
    _qwen_moe_fields(config, cfg)
    config.shared_expert_intermediate_size = config.intermediate_size
    config.use_sliding_window = False
    config.sliding_window = None
    return _finish(config, "Qwen2MoeForCausalLM")


def _qwen3_moe_config(base: dict, cfg: MoeBuildConfig) -> dict:
    config = transformers.Qwen3MoeConfig(**_dense(base))
    _qwen_moe_fields(config, cfg)
    return _finish(config, "Qwen3MoeForCausalLM")


def _moefuse_config(base: dict, cfg: MoeBuildConfig) -> dict:
    return {
        "model_type": MOEFUSE_MODEL_TYPE,
        "architectures": ["MoefuseMoeForCausalLM"],
        "base_config": dict(base),
        "num_experts": len(cfg.experts),
        "num_experts_per_tok": cfg.experts_per_token,
        "routing": "perplexity",
        "separate_attention": cfg.separate_attention,
        "routing_temperature": cfg.routing_temperature,
        "tie_word_embeddings": base.get("tie_word_embeddings", False),
    }


_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _projection(rest: str) -> str:
    """'mlp.gate_proj.weight' -> 'gate_proj'."""
    parts = rest.split(".")
    if len(parts) != 3 or parts[1] not in PROJECTIONS or parts[2] != "weight":
        raise MoeConfigError(f"FFN tensor '{rest}' is not a gated FFN weight ({', '.join(PROJECTIONS)}); "
                             "FFN biases and other FFN types are not supported")
    return parts[1]

MIXTRAL = Layout(
    "Mixtral", ("llama", "mistral"), 0, _mixtral_config,
    expert_names=lambda l, e, p: f"model.layers.{l}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[_projection(p)]}.weight",
    router_name=lambda l: f"model.layers.{l}.block_sparse_moe.gate.weight",
)
QWEN2_MOE = Layout(
    "Qwen MoE", ("llama", "mistral", "qwen2"), 1, _qwen2_moe_config,
    expert_names=lambda l, e, p: f"model.layers.{l}.mlp.experts.{e}.{_projection(p)}.weight",
    router_name=lambda l: f"model.layers.{l}.mlp.gate.weight",
    shared_expert_names=lambda l, p: f"model.layers.{l}.mlp.shared_expert.{_projection(p)}.weight",
    shared_gate_name=lambda l: f"model.layers.{l}.mlp.shared_expert_gate.weight",
    zero_attention_bias=True,
)
QWEN3_MOE = Layout(
    "Qwen3 MoE", ("qwen3",), 0, _qwen3_moe_config,
    expert_names=lambda l, e, p: f"model.layers.{l}.mlp.experts.{e}.{_projection(p)}.weight",
    router_name=lambda l: f"model.layers.{l}.mlp.gate.weight",
)
MOEFUSE_SHARED_ATTENTION = Layout(
    "moefuse", ("llama", "mistral", "qwen2", "qwen3"), 0, _moefuse_config,
    expert_names=lambda l, e, p: f"model.layers.{l}.mlp.experts.{e}.{_projection(p)}.weight",
)


@dataclass(frozen=True)
class _SeparateAttention(Layout):
    def dense_layer_tensor(self, key: str) -> bool:
        return ".layers." in key  # the whole decoder layer belongs to the expert


MOEFUSE_SEPARATE_ATTENTION = _SeparateAttention(
    "moefuse", ("llama", "mistral", "qwen2", "qwen3"), 0, _moefuse_config,
    expert_names=lambda l, e, rest: f"model.layers.{l}.experts.{e}.{rest}",
)

TOKEN_ROUTED_LAYOUTS: List[Layout] = [MIXTRAL, QWEN2_MOE, QWEN3_MOE]


def layout_names() -> List[str]:
    return [layout.name for layout in TOKEN_ROUTED_LAYOUTS] + ["moefuse"]


def select_layout(cfg: MoeBuildConfig, model_type: str) -> Layout:
    """The output layout for `cfg` and dense inputs of `model_type` (mergekit-moe's rules:
    `architecture` matches layout names by prefix; among fitting layouts Mixtral is preferred)."""
    wanted = (cfg.architecture or "").lower()
    if cfg.gate_mode == "perplexity" or cfg.separate_attention:
        if cfg.separate_attention and cfg.gate_mode != "perplexity":
            raise MoeConfigError("config: separate_attention needs sequence-level routing; set gate_mode: perplexity")
        if wanted and not "moefuse".startswith(wanted):
            raise MoeConfigError(f"config: gate_mode perplexity and separate_attention write the 'moefuse' model class, "
                                 f"not architecture '{cfg.architecture}'; drop 'architecture' or set it to moefuse")
        if cfg.shared_experts:
            raise MoeConfigError("config: shared_experts are not supported with gate_mode perplexity")
        layout = MOEFUSE_SEPARATE_ATTENTION if cfg.separate_attention else MOEFUSE_SHARED_ATTENTION
        _check_input_type(layout, model_type)
        return layout
    named = [layout for layout in TOKEN_ROUTED_LAYOUTS if layout.name.lower().startswith(wanted)]
    if not named:
        raise MoeConfigError(f"config: unknown architecture '{cfg.architecture}'; supported: {', '.join(layout_names())}")
    fitting = [layout for layout in named
               if model_type in layout.input_types and len(cfg.shared_experts) == layout.shared_experts]
    if not fitting:
        reasons = "; ".join(
            f"{layout.name} takes {'/'.join(layout.input_types)} models and {layout.shared_experts} shared expert(s)"
            for layout in named
        )
        raise MoeConfigError(
            f"no output architecture fits {model_type} models with {len(cfg.shared_experts)} shared expert(s): {reasons}"
        )
    return fitting[0]


def _check_input_type(layout: Layout, model_type: str) -> None:
    if model_type not in layout.input_types:
        raise MoeConfigError(f"the {layout.name} layout takes {'/'.join(layout.input_types)} models, not {model_type}")


def attention_bias_shapes(config: Dict) -> Dict[str, int]:
    """Sizes of the q/k/v projection biases of an attention layer with this config."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
