"""The quality evaluation end to end at smoke scale, and the benchmark report over its result."""

from __future__ import annotations

import json
import math

from benches import report
from benches.quality import run
from benches.quality.data import DOMAINS
from benches.quality.pipeline import MERGES


def test_quality_smoke_run_and_report(tmp_path):
    summary = run.main(["--smoke", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")])
    written = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert written["seed"] == 0 and written["machine"]["commit"]
    assert (tmp_path / "results" / "quality.png").stat().st_size > 0
    models = [row["model"] for row in written["rows"]]
    expected = ["base", *[f"expert: {d}" for d in DOMAINS],
                *[f"{m} ({tool})" for m in MERGES for tool in ("moefuse", "mergekit")],
                "MoE, random router", "MoE, hidden router", "MoE, perplexity routing",
                "MoE, perplexity routing, separate attention", "MoE, hidden router, router fine-tuned",
                "heterogeneous MoE (python 32-wide + arithmetic 24-wide)",
                "heterogeneous MoE (python 32-wide + arithmetic 24-wide), router+projectors fine-tuned"]
    assert sorted(models) == sorted(expected)
    for row in written["rows"]:
        for domain in (*DOMAINS, "average"):
            assert math.isfinite(row[domain]) and abs(math.exp(row[domain]) - row[f"{domain} ppl"]) < 1e-6 * row[f"{domain} ppl"]
    # the deterministic methods give the same model with either tool
    parity = summary["checks"]["moefuse vs mergekit |average loss difference|"]
    assert all(parity[m] < 1e-4 for m in ("average", "task arithmetic", "TIES")), parity
    text = report.report(tmp_path / "results")
    assert "miniature MergeME table" in text and "MoE, perplexity routing" in text and "quality.png" in text
