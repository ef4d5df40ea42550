"""`MoefuseMoeConfig`: the configuration of the `moefuse_moe` model class (MergeME's routing model).

config.json of a `moefuse_moe` checkpoint:
    {"model_type": "moefuse_moe", "architectures": ["MoefuseMoeForCausalLM"],
     "base_config": {<the dense model's config, model_type llama, mistral, qwen2 or qwen3>},
     "num_experts": E, "num_experts_per_tok": K, "routing": "perplexity",
     "separate_attention": true | false, "routing_temperature": 1.0,
     "tie_word_embeddings": <as the base>, "dtype": ...}
"""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from moefuse.moe.config import MoeConfigError

MODEL_TYPE = "moefuse_moe"
SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROUTING_MODES = ("perplexity",)


def _base_model_type(base_config) -> str | None:
    if isinstance(base_config, PreTrainedConfig):
        return base_config.model_type
    if isinstance(base_config, dict):
        return base_config.get("model_type")
    return None


class MoefuseMoeConfig(PreTrainedConfig):
    """A mixture of E dense decoders of one family, routed per sequence.

    Fields:
        base_config: the dense model's config (a dict in config.json, a transformers config object
            once loaded); its decoder layers, norms and rotary embedding are the family's own.
        num_experts: E >= 1 dense experts.
        num_experts_per_tok: K, 1 <= K <= E experts combined per sequence.
        routing: "perplexity" (MergeME): s_e = 1 / PPL_e of expert e on the input,
            w = softmax(s_topK / routing_temperature) on the K best experts, 0 elsewhere.
        separate_attention: True: every expert is a whole decoder layer (attention, norms, FFN);
            False: attention and norms are shared and only the SwiGLU FFNs are experts.
        routing_temperature: softmax temperature T > 0 of the routing.
        tie_word_embeddings: lm_head shares the input embedding (as the base).
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    base_config: dict | PreTrainedConfig | None = None
    num_experts: int = 2
    num_experts_per_tok: int = 1
    routing: str = "perplexity"
    separate_attention: bool = True
    routing_temperature: float = 1.0
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        model_type = _base_model_type(self.base_config)
        if self.base_config is not None and model_type not in SUPPORTED_BASE_MODEL_TYPES:
            raise MoeConfigError(
                f"moefuse_moe config: base_config.model_type {model_type!r} is not supported; "
                f"supported dense families: {', '.join(SUPPORTED_BASE_MODEL_TYPES)}"
            )
        super().__post_init__(**kwargs)
        self._check_routing()

    def _check_routing(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise MoeConfigError(f"moefuse_moe config: num_experts must be an integer >= 1, got {self.num_experts!r}")
        k = self.num_experts_per_tok
        if not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise MoeConfigError(
                f"moefuse_moe config: num_experts_per_tok must be an integer in [1, num_experts={self.num_experts}], "
                f"got {k!r}; lower it or add experts"
            )
        if self.routing not in ROUTING_MODES:
            raise MoeConfigError(
                f"moefuse_moe config: unknown routing {self.routing!r}; supported: {', '.join(ROUTING_MODES)}"
            )
        if not isinstance(self.separate_attention, bool):
            raise MoeConfigError(
                f"moefuse_moe config: separate_attention must be true or false, got {self.separate_attention!r}"
            )
        temperature = self.routing_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise MoeConfigError(
                f"moefuse_moe config: routing_temperature must be a number > 0, got {temperature!r}"
            )
