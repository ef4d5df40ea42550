"""Run the quality evaluation and write benches/results/quality.{json,png}.

    python -m benches.quality.run            # full run (CPU, about 5 minutes on 2 cores)
    python -m benches.quality.run --smoke    # tiny sizes, a few steps (what the test suite runs)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benches import plots
from benches.common import RESULTS, machine
from benches.quality.data import DOMAINS
from benches.quality.pipeline import FULL, SMOKE, Run


def markdown(summary: dict) -> str:
    lines = [
        f"Held-out next-token loss (perplexity) per domain; seed {summary['seed']}, commit "
        f"{summary['machine']['commit']}, {summary['machine']['device']}.",
        "",
        "| model | " + " | ".join(DOMAINS) + " | average |",
        "|---|" + "---:|" * (len(DOMAINS) + 1),
    ]
    for row in summary["rows"]:
        cells = [f"{row[d]:.3f} ({row[d + ' ppl']:.1f})" for d in (*DOMAINS, "average")]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    plt = plots.pyplot()

    rows = summary["rows"]
    figure, axis = plt.subplots(figsize=(12, 0.35 * len(rows) + 1.5))
    height = 0.8 / (len(DOMAINS) + 1)
    for index, domain in enumerate((*DOMAINS, "average")):
        axis.barh([r + index * height for r in range(len(rows))], [row[domain] for row in rows], height=height,
                  label=domain)
    axis.set_yticks([r + 0.4 for r in range(len(rows))], [row["model"] for row in rows])
    axis.invert_yaxis()
    axis.set_xlabel("held-out loss (nats/token)")
    axis.legend(loc="lower right")
    axis.set_title(f"merged models and MoEs from 4 domain experts (seed {summary['seed']})")
    plots.save_figure(figure, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit merges")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where quality.json/.png go")
    parser.add_argument("--work", type=Path, default=None, help="folder for the models (default: a temp folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        summary = Run(work, SMOKE if args.smoke else FULL, args.seed).run(with_mergekit=not args.no_mergekit)
    summary["machine"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.out / "quality.png")
    print(markdown(summary))
    print(json.dumps(summary["checks"], indent=1))
    return summary


if __name__ == "__main__":
    main()
