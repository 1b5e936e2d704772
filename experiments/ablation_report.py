"""Render the loop-recipe ablation (experiments/loop_ablation.py) as markdown tables for docs/results.md.

    python experiments/ablation_report.py runs/study/ablation_sudoku4_500 > /tmp/table.md

Reads every RUN/summary.json under ROOT/<task>/ and prints, per variant (mean +- half the range over seeds): the
validation NELBO at S = 4 at each evaluation, the final NELBO at S = 1, 4 and 8, and the solve rate at 4 and 16
decoding steps for S = 1, 4 and 8 (sudoku4 only). Also writes the per-run numbers to experiments/results/<root name>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def spread(values: list[float], digits: int) -> str:
    mean = sum(values) / len(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} +- {half:.{digits}f}"


def main() -> None:
    root = Path(sys.argv[1])
    summaries = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/summary.json"))]
    variants: dict[str, list[dict]] = {}
    for summary in summaries:
        variants.setdefault(summary["variant"], []).append(summary)
    steps = sorted({step for s in summaries for step, _ in s["val_nats"].get("4", s["val_nats"]["1"])})
    solved = all("solve_rate" in s for s in summaries)  # sudoku4 runs; language-model runs have none
    solve_header = " | solve 4 steps S=1 / 4 / 8 | solve 16 steps S=1 / 4 / 8" if solved else ""
    print("| variant | seeds | " + " | ".join(f"val S=4 @{step}" for step in steps)
          + " | final S=1 | final S=8" + solve_header + " |")
    print("|" + "---|" * (len(steps) + (6 if solved else 4)))
    for name, runs in sorted(variants.items(), key=lambda item: (item[0] != "mdm", item[0] != "paper", item[0])):
        curve_s = "4" if "4" in runs[0]["val_nats"] else "1"
        at = [spread([dict(map(tuple, r["val_nats"][curve_s]))[step] for r in runs], 3) for step in steps]
        final = [spread([r["val_nats"][s][-1][1] for r in runs], 3) if s in runs[0]["val_nats"] else "-"
                 for s in ("1", "8")]
        solve = [" / ".join(f"{100 * sum(r['solve_rate'][d].get(s, r['solve_rate'][d]['1']) for r in runs) / len(runs):.1f}"
                            for s in ("1", "4", "8")) for d in ("4", "16")] if solved else []
        print(f"| {name} | {len(runs)} | " + " | ".join(at + final + solve) + " |")
    out = Path(__file__).resolve().parent / "results" / f"{root.name}.json"
    out.write_text(json.dumps(summaries, indent=1) + "\n")


if __name__ == "__main__":
    main()
