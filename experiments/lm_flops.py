"""FLOPs-matched language modelling on character-level Shakespeare, and inference loop scaling.

Three models, each trained on the same total training FLOPs (seq 128, batch 16, d=128, 4 heads):
  * MDM     : 4 layers, no loop                               -> `--steps` updates
  * LoopMDM : the same 4 layers, core = layers 1-2, S ~ U{1..4} -> steps / (expected per-step cost ratio)
  * deep MDM: 7 layers (per-step FLOPs = LoopMDM's expected)  -> the same number of steps as LoopMDM
Validation NELBO is logged against cumulative training FLOPs; afterwards each final (EMA) checkpoint is scored on
the same held-out batches at S in {1, 2, 4, 6, 8, 12, 16, 24} (LoopMDM) or S = 1 (the others).

    python experiments/lm_flops.py --seeds 0 1 --steps 400
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from common import (
    CLI,
    DEEP,
    IMAGES,
    LOOP,
    MDM,
    REPO,
    RESULTS,
    cli_json,
    first_crossing,
    flops_per_token,
    loop_step_cost_ratio,
    mean_spread,
    run_jobs,
    save_json,
    val_curve,
)

LOOPS = [1, 2, 4, 6, 8, 12, 16, 24]
COMMON = ["data.seq_len=128", "train.batch_size=16", "model.d_model=128", "model.n_heads=4", "train.lr=0.002",
          "train.warmup_steps=40", "train.eval_batches=4", "train.log_every=20", "train.keep_last=1",
          "train.device=cpu", "sample.eval_loops=[4]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=400, help="MDM updates; the others get the same FLOPs")
    parser.add_argument("--evals", type=int, default=10, help="validation points per run")
    parser.add_argument("--root", default="runs/study/lm")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 16 for the loop scaling")
    parser.add_argument("--skip-training", action="store_true", help="reuse finished runs under --root")
    parser.add_argument("--reuse-eval", action="store_true",
                        help="with --skip-training: take the loop-scaling scores from experiments/results/lm_flops.json")
    args = parser.parse_args()

    ratio = loop_step_cost_ratio(128)
    deep_ratio = flops_per_token(128, n_layers=7) / flops_per_token(128, n_layers=4)
    variants = {"mdm": (MDM, args.steps), "loopmdm": (LOOP, round(args.steps / ratio)),
                "deep-mdm": (DEEP, round(args.steps / deep_ratio))}
    root = REPO / args.root
    runs = {(name, seed): root / f"{name}-s{seed}" for name in variants for seed in args.seeds}
    if not args.skip_training:
        commands, logs = [], []
        for (name, seed), out in runs.items():
            overrides, steps = variants[name]
            every = max(1, steps // args.evals)
            commands.append([*CLI[:1], str(REPO / "experiments" / "train_lm.py"), "tiny-cpu", str(out), *COMMON,
                             *overrides, f"train.steps={steps}", f"train.eval_every={every}",
                             f"train.ckpt_every={steps}", f"train.seed={seed}"])
            logs.append(out.with_suffix(".log"))
        run_jobs(commands, logs)

    scaling = {}
    if args.reuse_eval:
        saved = json.loads((RESULTS / "lm_flops.json").read_text())["scaling"]
        scaling = {run: {int(s): v for s, v in values.items()} for run, values in saved.items()}
    for (name, seed), out in runs.items():
        if f"{name}-s{seed}" in scaling:
            continue
        loops = LOOPS if name == "loopmdm" else [1]
        reports = cli_json(["eval", "--checkpoint", str(out), "--loops", *map(str, loops),
                            "--batches", str(args.eval_batches),
                            "--batch-size", "16", "--samples", "1", "--seed", "0", "--device", "cpu", "--json"])
        scaling[f"{name}-s{seed}"] = {r["loops"]: r["nats_per_token"] for r in reports}

    curves = {f"{name}-s{seed}": val_curve(out, 4 if name == "loopmdm" else 1) for (name, seed), out in runs.items()}
    steps = {name: n for name, (_, n) in variants.items()}
    summary = summarise(args.seeds, curves, scaling, steps)
    save_json("lm_flops", {"steps": {k: v[1] for k, v in variants.items()}, "loop_cost_ratio": ratio,
                           "curves": curves, "scaling": scaling, "summary": summary})
    plot(args.seeds, curves, scaling)
    print_tables(summary)


def summarise(seeds, curves, scaling, steps) -> dict:
    """Per seed: the FLOPs ratio at which LoopMDM (S=4 evaluations) reaches the MDM's final validation NELBO (the
    paper's measure; None when it never does), the converse ratio (LoopMDM's total FLOPs over those the MDM needed
    to reach LoopMDM's final NELBO), and the MDM's NELBO interpolated at LoopMDM's step count (equal data);
    plus the final NELBO of every model (mean and half-range over seeds)."""
    ratios, converse, equal_steps = [], [], []
    for seed in seeds:
        mdm_flops, mdm_nelbo = curves[f"mdm-s{seed}"]
        loop_flops, loop_nelbo = curves[f"loopmdm-s{seed}"]
        crossing = first_crossing(loop_flops, loop_nelbo, mdm_nelbo[-1])
        ratios.append(mdm_flops[-1] / crossing if crossing else None)
        reached = first_crossing(mdm_flops, mdm_nelbo, loop_nelbo[-1])
        converse.append(loop_flops[-1] / reached if reached else None)
        per_step = mdm_flops[-1] / steps["mdm"]
        equal_steps.append(float(np.interp(steps["loopmdm"] * per_step, mdm_flops, mdm_nelbo)))
    final = {name: mean_spread([scaling[f"{name}-s{s}"][1] for s in seeds]) for name in ("mdm", "deep-mdm")}
    for s in LOOPS:
        final[f"loopmdm S={s}"] = mean_spread([scaling[f"loopmdm-s{seed}"][s] for seed in seeds])
    return {"flops_ratio_per_seed": ratios, "converse_flops_ratio_per_seed": converse,
            "mdm_nelbo_at_loopmdm_steps": equal_steps, "final_nelbo": final}


def plot(seeds, curves, scaling) -> None:
    try:
        from loopdlm.eval.plots import plot_lines
    except ImportError:
        return
    series = {}
    for name in ("mdm", "loopmdm", "deep-mdm"):
        runs = [curves[f"{name}-s{seed}"] for seed in seeds]
        points = [[mean_spread(values) for values in zip(*(run[axis] for run in runs))] for axis in (0, 1)]
        series[f"{name} (mean of {len(seeds)} seeds, band = range)"] = (
            [f / 1e12 for f, _ in points[0]], [m for m, _ in points[1]], [h for _, h in points[1]])
    plot_lines(series, IMAGES / "lm_flops.png", "training FLOPs (TFLOP)", "val NELBO (nats/char)",
               "FLOPs-matched training (LoopMDM evaluated at S=4)")
    means = [mean_spread([scaling[f"loopmdm-s{seed}"][s] for seed in seeds]) for s in LOOPS]
    mdm = mean_spread([scaling[f"mdm-s{seed}"][1] for seed in seeds])[0]
    plot_lines({"LoopMDM": (LOOPS, [m for m, _ in means], [h for _, h in means])}, IMAGES / "lm_loop_scaling.png",
               "inference loops S", "val NELBO (nats/char)", "Loop scaling (trained with S ~ U{1..4})", logx=True,
               hline=(mdm, "MDM 4 layers (same FLOPs)"))


def print_tables(summary: dict) -> None:
    print("| model | val NELBO (nats/char), mean +- half-range |\n|---|---|")
    for name, (mean, spread) in summary["final_nelbo"].items():
        print(f"| {name} | {mean:.4f} +- {spread:.4f} |")
    for key in ("flops_ratio_per_seed", "converse_flops_ratio_per_seed", "mdm_nelbo_at_loopmdm_steps"):
        print(f"{key}: {summary[key]}")


if __name__ == "__main__":
    main()
