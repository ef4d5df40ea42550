"""moefuse's model classes reach transformers' Auto classes whatever is imported first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
names = [MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(t))].__name__ for t in ("moefuse_moe", "moefuse_hetero")]
assert names == ["MoefuseMoeForCausalLM", "MoefuseHeteroForCausalLM"], names
"""


@pytest.mark.parametrize("first", [
    "import moefuse",
    "import moefuse.moe.train",
    "import moefuse.moe.modeling_moefuse",
    "import moefuse.moe.modeling_hetero",
    "from transformers.models.auto import modeling_auto; import moefuse",
    "from transformers.models.auto import modeling_auto; import moefuse.moe.modeling_hetero",
])
def test_registration_in_any_import_order(first):
    result = subprocess.run([sys.executable, "-c", first + "\n" + CHECK], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
