"""PNG plots and Markdown tables of benchmark results (benches/results/*.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def plot(name: str, path: Path) -> None:
    """Bar chart of moefuse's speedup over its peer and of peak extra memory, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _load(path)
    rows = [r for r in data["rows"] if r.get("speedup") is not None]
    if not rows:
        return
    labels = [r["config"] for r in rows]
    figure, (speed, memory) = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.45), 8))
    speed.bar(labels, [r["speedup"] for r in rows], color="tab:blue")
    speed.set_ylabel(f"speedup over {rows[0]['peer']} (x)")
    speed.set_yscale("log")
    speed.set_title(f"{name} on {data['machine']['device']}")
    width = 0.4
    positions = range(len(rows))
    memory.bar([p - width / 2 for p in positions], [r["moefuse_extra_mem_x"] for r in rows], width, label="moefuse")
    memory.bar([p + width / 2 for p in positions], [r["peer_extra_mem_x"] for r in rows], width, label=rows[0]["peer"])
    memory.set_ylabel("peak extra memory (x one tensor)")
    memory.set_xticks(list(positions))
    memory.legend()
    for axis in (speed, memory):
        axis.tick_params(axis="x", rotation=70, labelsize=7)
    figure.tight_layout()
    figure.savefig(Path(path).with_suffix(".png"), dpi=110)
    plt.close(figure)


def markdown_table(path: Path) -> str:
    data = _load(path)
    lines = [
        f"Measured on {data['machine']['device']}, torch {data['machine']['torch']}, "
        f"commit {data['machine']['commit']}, {data['machine']['date']}.",
        "",
        "| config | moefuse ms | peer ms | speedup | moefuse GB/s (copy GB/s) | extra mem moefuse / peer (x tensor) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        if r.get("speedup") is None:
            continue
        lines.append(
            f"| {r['config']} | {r['moefuse_ms']:.0f} | {r['peer_ms']:.0f} | {r['speedup']:.1f}x | "
            f"{r['moefuse_gbps']:.1f} ({r['copy_gbps']:.1f}) | "
            f"{r['moefuse_extra_mem_x']:.2f} / {r['peer_extra_mem_x']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(Path(sys.argv[1])))
