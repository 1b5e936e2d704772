"""Ablation of the LoopMDM recipe options (issue 9): why the looped model lags the MDM early in training.

For a task and a list of named variants (each a set of config overrides on top of the paper-faithful recipe) x
seeds, train the LoopMDM variants and the same-size MDM for the same number of updates, recording the validation
NELBO every --eval-every updates at every S of --loops; on sudoku4 also the solve rate at each S with 4 and 16
decoding steps. Writes RUN/summary.json per run, ROOT/summary.json over all runs, a markdown table on stdout and
ROOT/curves_<task>.png with the early-training curves.

Every run is resumable: re-running the same command continues unfinished runs from their last checkpoint (taken
every --eval-every updates) and skips runs whose summary is written. Jobs run --parallel at a time, each with one
thread (see common.py).

    python experiments/loop_ablation.py --task sudoku4 --steps 500 --seeds 0 1 --variants paper concat zero-init
    python experiments/loop_ablation.py --task shakespeare --steps 400 --variant mine=model.loop_norm=true
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import MDM, REPO, cli_json, mean_spread, read_metrics, run_jobs, trained_to, training_command

#: task -> (preset, how it trains): sudoku4 fine-tunes on answer cells, shakespeare trains character-level.
TASKS = {"sudoku4": "sudoku4-tiny", "shakespeare": "tiny-cpu"}
#: Every loop-recipe option at the paper's choice: each variant is applied on top, so the study means the same when
#: the library defaults change.
PAPER = ["model.injection=none", "model.input_injection=false", "model.residual_init=default",
         "model.init_depth=stored", "model.loop_norm=false", "model.backprop_loops=0",
         "diffusion.loop_supervision=0.0", "train.loop_distribution=uniform", "train.clip_core_separately=false"]
#: Named variants; "{half}" becomes half the number of updates, "{lr_half}" half the preset's learning rate and
#: "{warmup_4x}" four times its warmup.
VARIANTS = {
    "paper": [],
    "add": ["model.injection=add"],
    "concat": ["model.injection=concat"],
    "zero-init": ["model.residual_init=zero"],
    "gated": ["model.residual_init=gated"],
    "effective-depth": ["model.init_depth=effective"],
    "loop-norm": ["model.loop_norm=true"],
    "deep-sup": ["diffusion.loop_supervision=0.5"],
    "poisson": ["train.loop_distribution=poisson_lognormal"],
    "curriculum": ["train.loop_distribution=curriculum", "train.loop_curriculum_steps={half}"],
    "truncated": ["model.injection=add", "model.backprop_loops=2"],
    "clip-core": ["train.clip_core_separately=true"],
    "no-clip": ["train.grad_clip=0"],
    "lr-half": ["train.lr={lr_half}"],
    "warmup-4x": ["train.warmup_steps={warmup_4x}"],
}
MDM_RUN = "mdm"
SUMMARY = "summary.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="sudoku4")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE...]",
                        help="an extra variant, e.g. mine=model.loop_norm=true,model.injection=add")
    parser.add_argument("--no-mdm", action="store_true", help="skip the MDM baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=500, help="optimizer updates of every run (fixed per --root)")
    parser.add_argument("--eval-every", type=int, default=50, help="validation (and checkpoint) interval")
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 8], help="S for validation and solving")
    parser.add_argument("--curve-loops", type=int, default=None, help="S of the plotted curves (default: the "
                        "preset's model.max_loops)")
    parser.add_argument("--decode-steps", type=int, nargs="+", default=[4, 16], help="sudoku4 decoding steps")
    parser.add_argument("--solve-n", type=int, default=200, help="held-out sudoku4 puzzles per evaluation")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time, one thread each")
    parser.add_argument("--root", default="runs/study/loop_ablation")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run (before variants)")
    args = parser.parse_args()

    # This process and its jobs run this checkout's library, whatever is installed.
    sys.path.insert(0, str(REPO / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    from loopdlm.config import load_config

    preset = load_config(TASKS[args.task], args.overrides).train
    variants = select_variants(args.variants, args.variant, {"half": max(1, args.steps // 2),
                                                              "lr_half": preset.lr / 2,
                                                              "warmup_4x": 4 * preset.warmup_steps})
    root = REPO / args.root / args.task
    runs = plan_runs(args, variants, root)
    pending = [run for run in runs if not finished(run)]
    train = [run for run in pending if not trained_to(run["dir"], run["steps"])]
    run_jobs([train_command(args, run) for run in train], [run["dir"].with_suffix(".log") for run in train],
             args.parallel)
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda run: summarise_run(args, run), pending))
    combined = combine(args, runs, root)
    for line in combined["table"]:
        print(line)
    print(f"summary: {root / SUMMARY}; curves: {combined['plot']}")


def select_variants(names: list[str], extra: list[str], values: dict[str, object]) -> dict[str, list[str]]:
    """{name: overrides} for the chosen built-in variants and the --variant ones, with `values` filled in."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)} or use --variant")
    chosen = {name: VARIANTS[name] for name in names}
    for item in extra:
        name, sep, overrides = item.partition("=")
        if not sep or not name or name in (*chosen, MDM_RUN):
            raise SystemExit(f"--variant {item!r} must be NEW_NAME=section.key=value[,section.key=value...]")
        chosen[name] = overrides.split(",")
    return {name: [o.format(**values) for o in overrides] for name, overrides in chosen.items()}


def plan_runs(args, variants: dict[str, list[str]], root: Path) -> list[dict]:
    """One dict per (variant, seed): name, seed, its folder and the overrides that define it."""
    # The MDM baseline first: every variant is read against it, so a study cut short still has it.
    models = {} if args.no_mdm else {MDM_RUN: PAPER + MDM}
    models.update({name: PAPER + overrides for name, overrides in variants.items()})
    return [{"variant": name, "seed": seed, "dir": root / f"{name}-s{seed}", "overrides": overrides,
             "steps": args.steps} for name, overrides in models.items() for seed in args.seeds]


def finished(run: dict) -> bool:
    """True when the run's summary is written; a summary for another number of updates is refused (the LR schedule
    depends on it, so a longer run is a new run: use another --root)."""
    path = run["dir"] / SUMMARY
    if not path.is_file():
        return False
    steps = json.loads(path.read_text())["steps"]
    if steps != run["steps"]:
        raise SystemExit(f"{run['dir']} was run for {steps} updates, not {run['steps']}; use another --root")
    return True


def train_command(args, run: dict) -> list[str]:
    settings = [*args.overrides, *run["overrides"], f"train.steps={args.steps}", f"train.seed={run['seed']}",
                f"train.eval_every={args.eval_every}", f"train.ckpt_every={args.eval_every}", "train.keep_last=1",
                f"sample.eval_loops=[{','.join(map(str, args.loops))}]", "train.device=cpu"]
    return training_command("sudoku4" if args.task == "sudoku4" else None, TASKS[args.task], run["dir"], settings)


def summarise_run(args, run: dict) -> None:
    """Write RUN/summary.json: the validation curves, the training losses and (sudoku4) the solve rates."""
    records = read_metrics(run["dir"])
    curves: dict[str, list] = {}
    for r in records:
        if r["split"] == "val":
            curves.setdefault(str(r["loops"]), []).append([r["step"], r["nats_per_token"]])
    summary = {"task": args.task, "variant": run["variant"], "seed": run["seed"], "steps": args.steps,
               "overrides": run["overrides"], "val_nats": curves,
               "train_loss": [[r["step"], r["loss"], r["loops"]] for r in records if r["split"] == "train"]}
    if args.task == "sudoku4":
        loops = [1] if run["variant"] == MDM_RUN else args.loops
        summary["solve_rate"] = {
            str(steps): {str(r["loops"]): r["accuracy"] for r in cli_json(
                ["eval-task", "--checkpoint", str(run["dir"]), "--n", str(args.solve_n), "--steps", str(steps),
                 "--loops", *map(str, loops), "--seed", "0", "--device", "cpu", "--json"])}
            for steps in args.decode_steps}
    (run["dir"] / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")


def combine(args, runs: list[dict], root: Path) -> dict:
    """Means over seeds per variant -> ROOT/summary.json, a markdown table and the curve plot."""
    summaries = [json.loads((run["dir"] / SUMMARY).read_text()) for run in runs]
    curve_s = str(args.curve_loops or default_max_loops(summaries))
    by_variant: dict[str, list[dict]] = {}
    for summary in summaries:
        by_variant.setdefault(summary["variant"], []).append(summary)
    header = ["variant", f"val nats S={curve_s} first eval", f"val nats S={curve_s} final"]
    solve_keys = [(d, s) for d in args.decode_steps for s in args.loops] if args.task == "sudoku4" else []
    header += [f"solve {d} steps S={s}" for d, s in solve_keys]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    variants = {}
    for variant, items in by_variant.items():
        curves = [item["val_nats"].get(curve_s) or item["val_nats"]["1"] for item in items]
        first = mean_spread([c[0][1] for c in curves])
        final = mean_spread([c[-1][1] for c in curves])
        solve = {f"{d}|{s}": mean_spread([item["solve_rate"][str(d)].get(str(s), item["solve_rate"][str(d)]["1"])
                                          for item in items]) for d, s in solve_keys}
        variants[variant] = {"seeds": [item["seed"] for item in items], "first_val": first, "final_val": final,
                             "solve_rate": solve, "curve": mean_curve(curves)}
        cells = [variant, fmt(first), fmt(final)] + [fmt(solve[f"{d}|{s}"], 3) for d, s in solve_keys]
        table.append("| " + " | ".join(cells) + " |")
    plot = plot_curves(variants, root / f"curves_{args.task}.png", args.task, curve_s)
    combined = {"task": args.task, "steps": args.steps, "curve_loops": int(curve_s), "variants": variants,
                "table": table, "plot": str(plot) if plot else None}
    (root / SUMMARY).write_text(json.dumps(combined, indent=1) + "\n")
    return combined


def default_max_loops(summaries: list[dict]) -> int:
    """The largest S validated in any run no larger than the preset's S_max (4 for both task presets)."""
    seen = sorted({int(s) for summary in summaries for s in summary["val_nats"]})
    return max([s for s in seen if s <= 4] or seen)


def mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """[[step, mean, half-range]] over seeds at the steps every seed evaluated."""
    steps = sorted(set.intersection(*[{step for step, _ in curve} for curve in curves]))
    values = [dict(map(tuple, curve)) for curve in curves]
    return [[step, *mean_spread([v[step] for v in values])] for step in steps]


def fmt(pair: tuple[float, float], digits: int = 4) -> str:
    return f"{pair[0]:.{digits}f} +- {pair[1]:.{digits}f}"


def plot_curves(variants: dict, path: Path, task: str, curve_s: str) -> Path | None:
    try:
        from loopdlm.eval.plots import plot_lines
    except ImportError:  # matplotlib is an optional extra
        return None
    series = {name: ([p[0] for p in v["curve"]], [p[1] for p in v["curve"]], [p[2] for p in v["curve"]])
              for name, v in variants.items()}
    return plot_lines(series, path, "optimizer updates", f"validation NELBO (nats/token), S={curve_s}",
                      f"{task}: LoopMDM recipe variants vs MDM, early training")


if __name__ == "__main__":
    main()
