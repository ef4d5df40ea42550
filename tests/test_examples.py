"""The example configs parse (their model paths are placeholders, so only the configs are checked)."""

from pathlib import Path

from moefuse.merge.config import parse_config
from moefuse.moe.config import parse_moe_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_merge_example_parses():
    config = parse_config(EXAMPLES / "ties.yml")
    assert config.merge_method == "ties" and len(config.models) == 2


def test_moe_example_parses():
    config = parse_moe_config(EXAMPLES / "moe.yml")
    assert len(config.experts) == 3 and config.gate_mode == "hidden"
    assert config.shared_rule("model.layers.0.self_attn.q_proj.weight").method == "ties"
    assert config.shared_rule("model.embed_tokens.weight").method == "base"
