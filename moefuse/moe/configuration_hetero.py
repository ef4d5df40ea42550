"""`MoefuseHeteroConfig`: the configuration of the `moefuse_hetero` model class (MergeME's
heterogeneous MoE: dense causal LMs of different families, widths and depths behind one router).

config.json of a `moefuse_hetero` checkpoint:
    {"model_type": "moefuse_hetero", "architectures": ["MoefuseHeteroForCausalLM"],
     "expert_configs": [{<dense config of expert 0>}, {<expert 1>}, ...],
     "hidden_size": D, "vocab_size": V, "num_experts_per_tok": K, "routing": "learned" | "perplexity",
     "routing_temperature": 1.0, "projector": "linear" | "mlp", "projector_hidden_size": H,
     "expert_tables": false, "router_aux_loss_coef": 0.01, "bos_token_id": ..., "eos_token_id": ..., "dtype": ...}
"""

from __future__ import annotations

from typing import List, Optional

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moefuse.moe.config import MoeConfigError

MODEL_TYPE = "moefuse_hetero"
ROUTING_MODES = ("learned", "perplexity")
PROJECTORS = ("linear", "mlp")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class MoefuseHeteroConfig(PreTrainedConfig):
    """A mixture of E whole dense causal LMs of any widths d_e <= D, routed per sequence.

    Fields:
        expert_configs: the experts' own configs (dicts, as in their config.json); each family must
            have a transformers base model (e.g. llama, mistral, qwen2, qwen3) and a causal-LM class.
        hidden_size: D, the width of the shared embedding, the mixing space and the shared head.
        vocab_size: V, rows of the shared embedding and head.
        num_experts_per_tok: K, 1 <= K <= E experts combined per sequence.
        routing: "learned": r = W_router * mean of the shared token embeddings over the real
            tokens; w = softmax(r_topK) on the K largest logits, 0 elsewhere.
            "perplexity" (MergeME, no fine-tuning): s_e = 1 / PPL_e of expert e alone on the
            input, w = softmax(s_topK / routing_temperature) on the K best experts.
        routing_temperature: T > 0 of perplexity routing.
        projector: "linear" (P(x) = W x) or "mlp" (P(x) = W x + W_down silu(W_up x)).
        projector_hidden_size: H, the hidden width of "mlp" projectors (default D).
        expert_tables: keep each expert's own embedding and head (`model.experts.{e}.embed_tokens`,
            `expert_heads.{e}`), used only to score perplexity routing, so that PPL_e is that of the
            dense expert itself (MergeME's heuristic); without them expert e is scored alone inside
            the MoE (shared tables and projectors), which equals the dense expert only when the
            shared tables are its own.
        router_aux_loss_coef: weight of the load-balancing loss in training.
    """

    model_type = MODEL_TYPE

    expert_configs: Optional[List[dict]] = None
    hidden_size: int = 64
    vocab_size: int = 32000
    num_experts_per_tok: int = 1
    routing: str = "learned"
    routing_temperature: float = 1.0
    projector: str = "linear"
    projector_hidden_size: Optional[int] = None
    expert_tables: bool = False
    router_aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.expert_configs is None:
            self.expert_configs = []
        self.expert_configs = [c.to_dict() if isinstance(c, PreTrainedConfig) else c for c in self.expert_configs]
        self._check()

    @property
    def num_experts(self) -> int:
        return len(self.expert_configs)

    def expert_config(self, index: int) -> PreTrainedConfig:
        """Expert `index`'s config as its family's transformers config object."""
        data = self.expert_configs[index]
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)

    def _check(self) -> None:
        # imported here: this module is loaded while transformers' Auto modules register it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

        where = "moefuse_hetero config"
        for index, data in enumerate(self.expert_configs):
            model_type = data.get("model_type") if isinstance(data, dict) else None
            if model_type not in MODEL_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                raise MoeConfigError(
                    f"{where}: expert_configs[{index}] has model_type {model_type!r}, which is not a dense causal "
                    "LM family of transformers (with a base model and a ForCausalLM class)"
                )
            if not _positive_int(data.get("hidden_size")) or data["hidden_size"] > self.hidden_size:
                raise MoeConfigError(
                    f"{where}: expert_configs[{index}].hidden_size {data.get('hidden_size')!r} must be a positive "
                    f"integer <= hidden_size={self.hidden_size}"
                )
        if self.expert_configs:
            k = self.num_experts_per_tok
            if not _positive_int(k) or k > self.num_experts:
                raise MoeConfigError(
                    f"{where}: num_experts_per_tok must be an integer in [1, num_experts={self.num_experts}], "
                    f"got {k!r}; lower it or add experts"
                )
        if self.routing not in ROUTING_MODES:
            raise MoeConfigError(f"{where}: unknown routing {self.routing!r}; supported: {', '.join(ROUTING_MODES)}")
        if self.projector not in PROJECTORS:
            raise MoeConfigError(f"{where}: unknown projector {self.projector!r}; supported: {', '.join(PROJECTORS)}")
        if self.projector_hidden_size is not None and not _positive_int(self.projector_hidden_size):
            raise MoeConfigError(
                f"{where}: projector_hidden_size must be a positive integer, got {self.projector_hidden_size!r}"
            )
        if not isinstance(self.expert_tables, bool):
            raise MoeConfigError(f"{where}: expert_tables must be true or false, got {self.expert_tables!r}")
        temperature = self.routing_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise MoeConfigError(f"{where}: routing_temperature must be a number > 0, got {temperature!r}")
        if not _positive_int(self.hidden_size) or not _positive_int(self.vocab_size):
            raise MoeConfigError(f"{where}: hidden_size and vocab_size must be positive integers")
