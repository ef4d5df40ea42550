"""PNG plots and Markdown tables of benchmark results (benches/results/*.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int = 110, title: str = "") -> None:
    """Lay `figure` out (under `title`, if any), write it to `path` and close it."""
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def plot(name: str, path: Path) -> None:
    """Bar chart of moefuse's speedup over its peer and of peak extra memory, per configuration."""
    plt = pyplot()

    data = _load(path)
    if data["rows"] and "tool" in data["rows"][0]:
        _plot_tools(name, data, Path(path))
        return
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
    memory.set_xticks(list(positions), labels)
    memory.legend()
    for axis in (speed, memory):
        axis.tick_params(axis="x", rotation=70, labelsize=7)
    save_figure(figure, Path(path).with_suffix(".png"))


def _plot_tools(name: str, data: dict, path: Path) -> None:
    """Wall time and peak RSS per tool (end-to-end benchmarks)."""
    rows = data["rows"]
    figure, (time_axis, memory_axis) = pyplot().subplots(1, 2, figsize=(11, 4))
    labels = [r["tool"] for r in rows]
    time_axis.barh(labels, [r["seconds"] for r in rows], color="tab:blue")
    time_axis.set_xlabel("wall time (s)")
    memory_axis.barh(labels, [r["peak_rss_gb"] for r in rows], color="tab:orange")
    memory_axis.set_xlabel("peak RSS (GB)")
    save_figure(figure, path.with_suffix(".png"),
                title=f"{name}: {rows[0]['config'].split(':')[0]} on {data['machine']['device']}")


def markdown_table(path: Path) -> str:
    data = _load(path)
    if data["rows"] and "tool" in data["rows"][0]:
        return _tools_table(data)
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


def _tools_table(data: dict) -> str:
    lines = [
        f"Measured on {data['machine']['device']}, torch {data['machine']['torch']}, "
        f"commit {data['machine']['commit']}, {data['machine']['date']}.",
        "",
        "| run | wall s | peak RSS GB | time vs moefuse |",
        "|---|---:|---:|---:|",
    ]
    for r in data["rows"]:
        rss = f"{r['peak_rss_gb']:.2f}" if r["peak_rss_gb"] else "-"
        lines.append(f"| {r['config']} | {r['seconds']:.1f} | {rss} | {r['moefuse_vs_tool']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    # python benches/plots.py RESULT.json [--plot]: print the Markdown table (and redraw the PNG)
    result = Path(sys.argv[1])
    if "--plot" in sys.argv:
        plot(result.stem, result)
    print(markdown_table(result))
