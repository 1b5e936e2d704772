"""Generative perplexity (with entropy) and the attention analysis on the models of lm_flops.py and tasks.py.

1. Train an autoregressive judge on the same corpus (`loopdlm train-judge --config judge-tiny`).
2. Sample unconditionally from each FLOPs-matched language model (ancestral, 64 steps, temperature 1, float64
   Gumbel, 128 characters) and score the samples with the judge; LoopMDM at several S.
3. Attention from masked queries to masked keys per layer application and noise level t, for LoopMDM vs MDM on
   text and for the sudoku LoopMDM.

    python experiments/genppl_attention.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json

from common import CLI, IMAGES, REPO, cli_json, mean_spread, run_jobs, save_json

GENPPL_LOOPS = [1, 4, 8]
TIMES = ["0.1", "0.3", "0.5", "0.7", "0.9"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--judge-steps", type=int, default=400)
    parser.add_argument("--samples", type=int, default=8, help="samples per model, loop count and seed")
    parser.add_argument("--lm-root", default="runs/study/lm")
    parser.add_argument("--task-root", default="runs/study/tasks")
    parser.add_argument("--skip-judge", action="store_true")
    args = parser.parse_args()
    lm, tasks, judge = REPO / args.lm_root, REPO / args.task_root, REPO / "runs/study/judge"

    if not args.skip_judge:
        run_jobs([[*CLI, "train-judge", "--config", "judge-tiny", f"train.steps={args.judge_steps}",
                   f"train.ckpt_every={args.judge_steps}", "train.device=cpu", f"train.out_dir={judge}"]],
                 [judge.with_suffix(".log")], parallel=1)
    judge_val = [json.loads(line) for line in (judge / "metrics.jsonl").read_text().splitlines()
                 if '"val"' in line][-1]["nats_per_token"]

    genppl = {}
    for seed in args.seeds:
        for name in ("mdm", "deep-mdm", "loopmdm"):
            for loops in (GENPPL_LOOPS if name == "loopmdm" else [1]):
                genppl[f"{name}|{loops}|{seed}"] = cli_json([
                    "genppl", "--checkpoint", str(lm / f"{name}-s{seed}"), "--judge", str(judge),
                    "--num-samples", str(args.samples), "--batch-size", str(args.samples), "--sampler", "ancestral",
                    "--steps", "64", "--loops", str(loops), "--seed", str(seed), "--device", "cpu", "--json"])

    attention = {}
    for seed in args.seeds:
        for label, checkpoint, loops in (("lm-loopmdm", lm / f"loopmdm-s{seed}", 8),
                                         ("lm-mdm", lm / f"mdm-s{seed}", 1),
                                         ("sudoku-loopmdm", tasks / f"sudoku4-loopmdm-s{seed}", 8),
                                         ("sudoku-mdm", tasks / f"sudoku4-mdm-s{seed}", 1)):
            out = IMAGES / f"attention_{label}.png" if seed == args.seeds[0] else None
            command = ["attention", "--checkpoint", str(checkpoint), "--loops", str(loops), "--n", "32",
                       "--times", *TIMES, "--seed", "0", "--device", "cpu", "--json"]
            attention[f"{label}|{seed}"] = cli_json(command + (["--out", str(out)] if out else []))

    save_json("genppl_attention", {"judge_val_nats": judge_val, "genppl": genppl, "attention": attention})
    print(f"judge validation NLL {judge_val:.4f} nats/char\n")
    print("| model | S | gen-PPL | entropy (nats) | distinct-2 | distinct-4 |\n|---|---|---|---|---|---|")
    for name in ("mdm", "deep-mdm", "loopmdm"):
        for loops in (GENPPL_LOOPS if name == "loopmdm" else [1]):
            rows = [genppl[f"{name}|{loops}|{seed}"] for seed in args.seeds]
            cells = [mean_spread([r[key] for r in rows]) for key in ("gen_ppl", "entropy", "distinct_2", "distinct_4")]
            print(f"| {name} | {loops} | " + " | ".join(f"{m:.3f} +- {h:.3f}" for m, h in cells) + " |")
    print("\nmasked-key attention mass (mean over applications of the core / all layers):")
    for key, records in attention.items():
        for t in (0.1, 0.5, 0.9):
            rows = [r for r in records if abs(r["t"] - t) < 1e-9]
            core = [r["masked_mass"] for r in rows if r["loop"] > 0]
            print(f"{key} t={t}: share {rows[0]['masked_key_fraction']:.3f} | by depth "
                  + " ".join(f"{r['masked_mass']:.3f}" for r in rows)
                  + (f" | core loop 1 {core[0]:.3f} -> last {core[-1]:.3f}" if core else ""))


if __name__ == "__main__":
    main()
