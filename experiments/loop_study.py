"""The long LoopMDM study (issue 9, part 2): LoopMDM against the same-size MDM at equal updates and at equal
training FLOPs, and the deeper MDM with matched per-step FLOPs; on depth-bound tasks a decoding-steps x loop-count
grid and adaptive loop exit against the best fixed S; on character-level Shakespeare the validation NELBO against
training FLOPs, the FLOPs ratio at which LoopMDM reaches the MDM's final NELBO, and NELBO against S.

Runs per seed (every model is the task preset's 4-layer d=128 stack unless said; every loop-recipe option is
spelled out, so a model keeps its meaning when the library defaults change):
  mdm              the same 4 layers, no loop, --steps updates
  loopmdm          the loop-norm recipe (core = layers 1-2, S ~ U{1..4}, loop norm: the library's default model)
  loopmdm-eqflops  the same recipe with the MDM's training FLOPs (fewer updates, its own full LR schedule)
  paper            the paper-faithful recipe (no loop norm), --steps updates
  loopmdm-inject   the loop-norm recipe plus additive input injection (the prelude output added before every loop)
  loopmdm-deepsup  loopmdm-inject plus per-loop supervision (weight 1): the looped-transformer recipe that Yang et
                   al. (2023) found to converge to a fixed point and hold its accuracy beyond the trained loop count
  loopmdm-sup      the loop-norm recipe plus per-loop supervision (weight 1), without injection: the recipe of
                   the sudoku4-tiny preset
  deep             a 7-layer MDM: LoopMDM's expected per-step FLOPs, --steps updates
  mdm-eqflops      the MDM with the loopmdm model's training FLOPs (more updates, its own full LR schedule)
  mdm-long         the MDM with 4x --steps updates: about 2.3x the loopmdm model's training FLOPs, the paper's
                   lower FLOPs ratio (does the MDM catch up when given that much more compute?)

On a task, each trained run is scored on --n held-out problems (the task's test split, the same for every run), greedy
most-confident-first: at the first count of --decode-steps at every S of --loops and (looped runs) with the adaptive
exit policy for every --exit-eps at every cap of --exit-caps; at the other counts at every S of --short-loops. On
shakespeare, each run is scored on the same --lm-batches validation batches at every S. Scores are cached in
RUN/scores.json, so an interrupted study resumes where it stopped: training continues from the last checkpoint,
finished scores are kept.

    python experiments/loop_study.py --task sudoku4 --steps 2000 --seeds 0 1
    python experiments/loop_study.py --task sudoku9:givens=34 --steps 2000 --models mdm loopmdm
    python experiments/loop_study.py --task shakespeare --steps 3000 --batch-size 32 --models mdm loopmdm deep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from common import (DEEP, IMAGES, MDM, REPO, RESULTS, cli_json, first_crossing, mean_spread, read_metrics, run_jobs,
                    trained_to, training_command)
from loop_ablation import PAPER

#: task name -> training preset; "shakespeare" is character-level language modelling, the rest are generated tasks.
PRESETS = {"sudoku4": "sudoku4-tiny", "sudoku9": "sudoku4-tiny", "add": "add-tiny", "mul": "add-tiny",
           "shakespeare": "tiny-cpu"}
LM = "shakespeare"
MODELS = ["mdm", "mdm-eqflops", "mdm-long", "loopmdm", "loopmdm-eqflops", "paper", "loopmdm-inject",
          "loopmdm-deepsup", "loopmdm-sup", "deep"]
#: The loop-norm recipe (the library's default model; the sudoku4 preset adds per-loop supervision), spelled out so
#: the study keeps its meaning.
LOOPMDM = [*PAPER, "model.loop_norm=true"]
LOOPED = {"loopmdm", "loopmdm-eqflops", "paper", "loopmdm-inject", "loopmdm-deepsup", "loopmdm-sup"}
SCORES = "scores.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sudoku4", help="a generated task spec, e.g. sudoku4, sudoku9:givens=34, "
                        "add:digits=4")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=2000, help="updates of the MDM (and of every equal-steps run)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--eval-every", type=int, default=250, help="validation (and checkpoint) interval")
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 6, 8, 12, 16, 24])
    parser.add_argument("--decode-steps", type=int, nargs="+", default=[4, 16], help="the first gets the whole S "
                        "grid and the adaptive policy; the others --short-loops only (scoring cost grows with S)")
    parser.add_argument("--short-loops", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--exit-eps", type=float, nargs="+", default=[0.5, 0.4, 0.3, 0.2, 0.1])
    parser.add_argument("--exit-caps", type=int, nargs="+", default=[4, 24], help="largest S of the adaptive "
                        "policy (the presets train with S_max = 4)")
    parser.add_argument("--n", type=int, default=200, help="held-out problems per score")
    parser.add_argument("--lm-batches", type=int, default=32, help="shakespeare: validation batches per score")
    parser.add_argument("--attention-loops", type=int, default=8, help="S of the attention analysis of looped runs "
                        "(masked-query attention to masked keys per core layer and loop; 0 = skip)")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time, one thread each")
    parser.add_argument("--root", default=None, help="default: runs/study/loop_study/TASK-STEPS")
    parser.add_argument("--train-only", action="store_true", help="train (or resume) the runs, score nothing")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    task_name = args.task.split(":")[0]
    if task_name not in PRESETS:
        raise SystemExit(f"--task must be one of {', '.join(PRESETS)} (with options), got {args.task!r}")
    slug = args.task.replace(":", "-").replace("=", "").replace(",", "-")
    root = REPO / (args.root or f"runs/study/loop_study/{slug}-{args.steps}")
    runs = plan_runs(args, root)
    pending = [run for run in runs if not trained_to(run["dir"], run["steps"])]
    run_jobs([train_command(args, run) for run in pending], [run["dir"].with_suffix(".log") for run in pending],
             args.parallel)
    if args.train_only:
        return
    for run in runs:
        score_run(args, run)
    combined = combine(args, runs, slug)
    for line in combined["table"]:
        print(line)


def model_overrides(model: str) -> list[str]:
    """Config overrides of a model on top of the task preset (every loop-recipe option spelled out)."""
    return {"mdm": MDM, "mdm-eqflops": MDM, "mdm-long": MDM, "loopmdm": LOOPMDM, "loopmdm-eqflops": LOOPMDM,
            "paper": PAPER, "loopmdm-inject": [*LOOPMDM, "model.injection=add"],
            "loopmdm-deepsup": [*LOOPMDM, "model.injection=add", "diffusion.loop_supervision=1.0"],
            "loopmdm-sup": [*LOOPMDM, "diffusion.loop_supervision=1.0"], "deep": DEEP}[model]


def equal_flops_steps(args, preset: str, model: str) -> int:
    """Updates that give `model` the other one's expected training FLOPs at --steps updates: the loop-norm LoopMDM
    the MDM's (loopmdm-eqflops), or the MDM the loop-norm LoopMDM's (mdm-eqflops)."""
    from loopdlm.config import load_config
    from loopdlm.data.task_spec import get_task
    from loopdlm.models.transformer import LoopedTransformer

    if args.task == LM:
        seq_len = load_config(preset, args.overrides).data.seq_len
    else:
        task = get_task(args.task)
        seq_len = task.prompt_length + task.answer_length + 1

    def per_token(overrides: list[str]) -> float:
        config = load_config(preset, [*args.overrides, *overrides, "model.vocab_size=16"])
        expected = (config.model.max_loops + 1) / 2 if config.model.core_end > config.model.core_start else 1
        return LoopedTransformer(config.model).flops_per_token(seq_len, expected)

    ratio = per_token(MDM) / per_token(LOOPMDM)
    return round(args.steps * (ratio if model == "loopmdm-eqflops" else 1 / ratio))


def plan_runs(args, root: Path) -> list[dict]:
    """One dict per (model, seed): its folder, updates and overrides. The MDM first: every model is read against it."""
    preset = PRESETS[args.task.split(":")[0]]
    runs = []
    for model in args.models:
        if model in ("loopmdm-eqflops", "mdm-eqflops"):
            steps = equal_flops_steps(args, preset, model)
        else:
            steps = 4 * args.steps if model == "mdm-long" else args.steps
        for seed in args.seeds:
            runs.append({"model": model, "seed": seed, "steps": steps, "preset": preset,
                         "dir": root / f"{model}-s{seed}", "overrides": model_overrides(model)})
    return runs


def train_command(args, run: dict) -> list[str]:
    val_loops = [s for s in args.loops if s <= 8] if run["model"] in LOOPED else [1]
    settings = [*args.overrides, *run["overrides"], f"train.steps={run['steps']}", f"train.seed={run['seed']}",
                f"train.eval_every={args.eval_every}", f"train.ckpt_every={args.eval_every}", "train.keep_last=1",
                f"sample.eval_loops=[{','.join(map(str, val_loops))}]", "train.device=cpu"]
    if args.batch_size:
        settings.append(f"train.batch_size={args.batch_size}")
    return training_command(None if args.task == LM else args.task, run["preset"], run["dir"], settings)


def score_run(args, run: dict) -> None:
    """Fill RUN/scores.json with every (policy, decoding steps, S, eps) score -- on shakespeare every S's
    validation NELBO -- not already there."""
    path = run["dir"] / SCORES
    scores = json.loads(path.read_text()) if path.is_file() else {}
    looped = run["model"] in LOOPED
    if args.task == LM:
        missing = [s for s in (args.loops if looped else [1]) if f"nelbo|{s}" not in scores]
        if missing:
            # The same --seed for every run: every model is scored on the same text with the same noise.
            for report in cli_json(["eval", "--checkpoint", str(run["dir"]), "--loops", *map(str, missing),
                                    "--batches", str(args.lm_batches), "--batch-size", "32", "--seed", "0",
                                    "--device", "cpu", "--json"]):
                scores[f"nelbo|{report['loops']}"] = report
            path.write_text(json.dumps(scores, indent=1) + "\n")
        return
    base = ["eval-task", "--checkpoint", str(run["dir"]), "--n", str(args.n), "--seed", "0", "--device", "cpu",
            "--json"]
    for steps in args.decode_steps:
        loops = grid_loops(args, steps) if looped else [1]
        missing = [s for s in loops if f"fixed|{steps}|{s}" not in scores]
        if missing:
            for report in cli_json([*base, "--steps", str(steps), "--loop-policy", "fixed",
                                    "--loops", *map(str, missing)]):
                scores[f"fixed|{steps}|{report['loops']}"] = report
            path.write_text(json.dumps(scores, indent=1) + "\n")
        for cap, eps in adaptive_settings(args, steps) if looped else []:
            key = f"adaptive|{steps}|{cap}|{eps}"
            if key not in scores:
                (report,) = cli_json([*base, "--steps", str(steps), "--loop-policy", "adaptive", "--loop-eps",
                                      str(eps), "--loops", str(cap)])
                scores[key] = report
                path.write_text(json.dumps(scores, indent=1) + "\n")
    key = f"attention|{args.attention_loops}"
    if looped and args.attention_loops and key not in scores:
        scores[key] = cli_json(["attention", "--checkpoint", str(run["dir"]), "--loops", str(args.attention_loops),
                                "--n", "64", "--seed", "0", "--device", "cpu", "--json"])
        path.write_text(json.dumps(scores, indent=1) + "\n")


def grid_loops(args, steps: int) -> list[int]:
    """The S values scored at `steps` decoding steps: the whole grid at the first --decode-steps, else the short one."""
    return args.loops if steps == args.decode_steps[0] else args.short_loops


def adaptive_settings(args, steps: int) -> list[tuple[int, float]]:
    """(cap, eps) pairs of the adaptive policy scored at `steps` decoding steps (the first --decode-steps only)."""
    return [(cap, eps) for cap in args.exit_caps for eps in args.exit_eps] if steps == args.decode_steps[0] else []


def combine(args, runs: list[dict], slug: str) -> dict:
    """Means over seeds -> experiments/results/study_SLUG_STEPS.json, markdown tables and plots."""
    by_model: dict[str, list[dict]] = {}
    for run in runs:
        records = read_metrics(run["dir"])
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "val"]
        by_model.setdefault(run["model"], []).append({
            "seed": run["seed"], "steps": run["steps"], "flops": train[-1]["flops"],
            "val": {str(s): [[r["step"], r["flops"], r["nats_per_token"]] for r in val if r["loops"] == s]
                    for s in sorted({r["loops"] for r in val})},
            "scores": json.loads((run["dir"] / SCORES).read_text())})
    summary = {"task": args.task, "steps": args.steps, "n": args.n, "loops": args.loops,
               "decode_steps": args.decode_steps, "exit_eps": args.exit_eps, "exit_caps": args.exit_caps,
               "overrides": args.overrides,
               "models": {}}
    out = RESULTS / f"study_{slug}_{args.steps}.json"
    kept = kept_models(out, summary)
    fresh = {model: (summarise_lm_model if args.task == LM else summarise_model)(args, model, items)
             for model, items in by_model.items()}
    merged = {**kept, **fresh}
    summary["models"] = {model: merged[model] for model in MODELS if model in merged}
    # Against the MDM, and against the MDM given LoopMDM's training FLOPs where the study has it.
    summary["flops_ratio"] = {reference: flops_ratios(summary["models"], reference)
                              for reference in ("mdm", "mdm-eqflops") if reference in summary["models"]}
    if args.task == LM:
        summary["table"] = lm_tables(args, summary["models"], summary["flops_ratio"].get("mdm", {}))
    else:
        summary["table"] = tables(args, summary["models"]) + ratio_table(summary["flops_ratio"])
    summary["plots"] = plots(args, summary["models"], slug)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"summary: {out}")
    return summary


def kept_models(out: Path, summary: dict) -> dict:
    """The model summaries of an earlier run of the study on the same task, budget and scoring (`out`), so that a
    study run over some models adds to the summary instead of replacing it (run folders are not kept in git)."""
    if not out.is_file():
        return {}
    earlier = json.loads(out.read_text())
    same = all(earlier.get(key) == value for key, value in summary.items() if key != "models")
    return earlier["models"] if same else {}


def summarise_model(args, model: str, items: list[dict]) -> dict:
    """Per model: updates, training FLOPs, final validation NELBO per S and mean solve rates over seeds."""
    looped = model in LOOPED
    accuracy = {}
    for steps in args.decode_steps:
        for s in (grid_loops(args, steps) if looped else [1]):
            values = [item["scores"][f"fixed|{steps}|{s}"]["accuracy"] for item in items]
            accuracy[f"{steps}|{s}"] = [*mean_spread(values), values]
    adaptive = {}
    for steps in args.decode_steps:
        for cap, eps in adaptive_settings(args, steps) if looped else []:
            reports = [item["scores"][f"adaptive|{steps}|{cap}|{eps}"] for item in items]
            adaptive[f"{steps}|{cap}|{eps}"] = {
                "accuracy": [*mean_spread([r["accuracy"] for r in reports]), [r["accuracy"] for r in reports]],
                "core_per_step": mean_spread([r["core_applications"] / steps for r in reports])[0]}
    final_val = {s: mean_spread([item["val"][s][-1][2] for item in items if s in item["val"]])
                 for s in items[0]["val"]}
    return {"seeds": [item["seed"] for item in items], "updates": items[0]["steps"],
            "train_flops": mean_spread([item["flops"] for item in items])[0], "final_val": final_val,
            "val_curves": {item["seed"]: item["val"] for item in items}, "accuracy": accuracy,
            "adaptive": adaptive, "attention_lift": attention_lift(args, items) if looped else {}}


def attention_lift(args, items: list[dict]) -> dict[str, list[float]]:
    """"layer|loop" -> [mean, half-range] over seeds of the masked-key lift (attention mass on masked keys over
    their share of the keys) of masked queries, averaged over the analysed noise levels; core layers only."""
    key = f"attention|{args.attention_loops}"
    if not args.attention_loops or any(key not in item["scores"] for item in items):
        return {}
    per_seed = []
    for item in items:
        cells: dict[str, list[float]] = {}
        for record in item["scores"][key]:
            if record["loop"] > 0:
                cells.setdefault(f"{record['layer']}|{record['loop']}", []).append(record["lift"])
        per_seed.append({cell: sum(v) / len(v) for cell, v in cells.items()})
    return {cell: list(mean_spread([seed[cell] for seed in per_seed])) for cell in per_seed[0]}


def summarise_lm_model(args, model: str, items: list[dict]) -> dict:
    """Per model: updates, training FLOPs, validation curves and the held-out bits/char at every S (mean over seeds,
    half-range, and the mean of the per-run standard errors)."""
    loops = args.loops if model in LOOPED else [1]
    bits = {}
    for s in loops:
        reports = [item["scores"][f"nelbo|{s}"] for item in items]
        bits[str(s)] = [*mean_spread([r["bits_per_char"] for r in reports]),
                        mean_spread([r["standard_error"] / math.log(2) for r in reports])[0]]
    final_val = {s: mean_spread([item["val"][s][-1][2] for item in items if s in item["val"]])
                 for s in items[0]["val"]}
    return {"seeds": [item["seed"] for item in items], "updates": items[0]["steps"],
            "train_flops": mean_spread([item["flops"] for item in items])[0], "final_val": final_val,
            "val_curves": {item["seed"]: item["val"] for item in items}, "bits_per_char": bits}


def flops_ratios(models: dict[str, dict], reference: str = "mdm") -> dict:
    """Per model and seed: the `reference` model's training FLOPs over the FLOPs at which this model's validation
    curve (at the training S_max for looped models) first reaches the same-seed reference's final validation
    NELBO; None = never. Read from the model summaries, so models kept from an earlier run of the study count."""
    def curves(model: str) -> dict[str, list]:
        return {str(seed): by_loops["4" if "4" in by_loops else "1"]
                for seed, by_loops in models[model]["val_curves"].items()}

    baseline = curves(reference)
    ratios = {}
    for model in models:
        if model == reference:
            continue
        per_seed = {}
        for seed, curve in curves(model).items():
            if seed not in baseline:
                continue
            target, budget = baseline[seed][-1][2], baseline[seed][-1][1]
            reached = first_crossing([p[1] for p in curve], [p[2] for p in curve], target)
            per_seed[seed] = None if reached is None else budget / reached
        ratios[model] = per_seed
    return ratios


def ratio_cells(per_seed: dict) -> str:
    """One table cell: 's0: 1.45x, s1: not reached' for a {seed: ratio or None} map."""
    return ", ".join(f"s{seed}: {'not reached' if r is None else f'{r:.2f}x'}" for seed, r in per_seed.items())


def ratio_table(ratios: dict) -> list[str]:
    """Markdown: per reference MDM and model, the FLOPs ratio per seed at which the model reaches its final NELBO."""
    lines = ["", "| FLOPs ratio to the final NELBO of | model | per seed (reference FLOPs / FLOPs to reach it) |",
             "|---|---|---|"]
    for reference, per_model in ratios.items():
        lines += [f"| {reference} | {model} | {ratio_cells(per_seed)} |" for model, per_seed in per_model.items()]
    return lines


def lm_tables(args, models: dict, ratios: dict) -> list[str]:
    loops = [s for s in args.loops]
    lines = ["| model | updates | train TFLOP | FLOPs ratio to the MDM's final NELBO | "
             + " | ".join(f"bits/char S={s}" for s in loops) + " |", "|---|---|---|---|" + "---|" * len(loops)]
    for model, m in models.items():
        ratio_text = "-" if model == "mdm" else ratio_cells(ratios.get(model, {}))
        cells = [f"{m['bits_per_char'][str(s)][0]:.4f} +- {m['bits_per_char'][str(s)][1]:.4f}"
                 if str(s) in m["bits_per_char"] else "" for s in loops]
        lines.append(f"| {model} | {m['updates']} | {m['train_flops'] / 1e12:.1f} | {ratio_text} | "
                     + " | ".join(cells) + " |")
    se = max(v[2] for m in models.values() for v in m["bits_per_char"].values())
    lines.append(f"\n(+- is half the range over seeds; one run's standard error is at most {se:.4f} bits/char)")
    return lines


def tables(args, models: dict) -> list[str]:
    lines = ["| model | updates | train TFLOP | val NELBO (S = 1 / 4) | "
             + " | ".join(f"solve, {d} steps" for d in args.decode_steps) + " |",
             "|---|---|---|---|" + "---|" * len(args.decode_steps)]
    for model, m in models.items():
        best = {}
        for d in args.decode_steps:
            cells = solve_rates(m, d)
            s = max(cells, key=lambda s: cells[s][0])
            best[d] = (s, cells[s], cells.get(1))
        val = " / ".join(f"{m['final_val'][s][0]:.3f}" for s in ("1", "4") if s in m["final_val"])
        solve = " | ".join(
            (f"{100 * b[1][0]:.1f} +- {100 * b[1][1]:.1f}% (S = {b[0]}; S = 1: {100 * b[2][0]:.1f}%)"
             if len(m["accuracy"]) > len(args.decode_steps) else f"{100 * b[1][0]:.1f} +- {100 * b[1][1]:.1f}%")
            for b in best.values())
        lines.append(f"| {model} | {m['updates']} | {m['train_flops'] / 1e12:.2f} | {val} | {solve} |")
    lines.append(f"\n(+- is half the range over seeds; {args.n} puzzles per score: a binomial standard error of at "
                 f"most {50 / math.sqrt(args.n):.1f} points per run)")
    lines += ["", "| model | decoding steps | " + " | ".join(f"S={s}" for s in args.loops) + " |",
              "|---|---|" + "---|" * len(args.loops)]
    for model, m in models.items():
        if model not in LOOPED:
            continue
        for d in args.decode_steps:
            lines.append(f"| {model} | {d} | " + " | ".join(
                f"{100 * m['accuracy'][f'{d}|{s}'][0]:.1f}" if f"{d}|{s}" in m["accuracy"] else "-"
                for s in args.loops) + " |")
    lines += ["", "| model | decoding steps | best fixed S | cheapest fixed S within one s.e. of it | adaptive cap "
              "| " + " | ".join(f"adaptive eps={e}" for e in args.exit_eps) + " |",
              "|---|---|---|---|---|" + "---|" * len(args.exit_eps)]
    for model, m in models.items():
        if not m["adaptive"]:
            continue
        for d in args.decode_steps[:1]:
            cells = {s: m["accuracy"][f"{d}|{s}"][0] for s in args.loops}
            best = max(cells, key=cells.get)
            se = binomial_se(cells[best], args, len(m["seeds"]))
            cheapest = min(s for s in args.loops if cells[s] >= cells[best] - se)
            for cap in args.exit_caps:
                row = [f"{100 * m['adaptive'][f'{d}|{cap}|{e}']['accuracy'][0]:.1f}% at "
                       f"{m['adaptive'][f'{d}|{cap}|{e}']['core_per_step']:.2f}" for e in args.exit_eps]
                lines.append(f"| {model} | {d} | S = {best}: {100 * cells[best]:.1f}% | S = {cheapest}: "
                             f"{100 * cells[cheapest]:.1f}% | {cap} | " + " | ".join(row) + " |")
    lines.append("(adaptive cells: solve rate at mean core applications per decoding step; a fixed S uses S)")
    lines += ["", *scaling_verdicts(args, models, training_s_max(args))]
    if not any(m.get("attention_lift") for m in models.values()):
        return lines
    lines += ["", "| masked-key lift: model | core layer | "
              + " | ".join(f"loop {k}" for k in range(1, args.attention_loops + 1)) + " |",
              "|---|---|" + "---|" * args.attention_loops]
    for model, m in models.items():
        layers = sorted({int(cell.split("|")[0]) for cell in m.get("attention_lift", {})})
        for layer in layers:
            lifts = [m["attention_lift"][f"{layer}|{k}"] for k in range(1, args.attention_loops + 1)]
            lines.append(f"| {model} | {layer} | " + " | ".join(f"{v[0]:.2f} +- {v[1]:.2f}" for v in lifts) + " |")
    return lines


def solve_rates(m: dict, decode_steps: int) -> dict[int, list]:
    """S -> [mean, half-range, per-seed values] of a model summary's solve rates at `decode_steps` decoding steps."""
    return {int(k.split("|")[1]): v for k, v in m["accuracy"].items() if k.startswith(f"{decode_steps}|")}


def binomial_se(rate: float, args, seeds: int, floor: float = 0.0) -> float:
    """Standard error of a mean over `seeds` binomial rates, each on args.n problems (variance at least `floor`)."""
    return math.sqrt(max(rate * (1 - rate), floor) / (args.n * seeds))


def training_s_max(args) -> int:
    """The S_max that the task preset trains with (model.max_loops)."""
    from loopdlm.config import load_config

    return load_config(PRESETS[args.task.split(":")[0]], args.overrides).model.max_loops


def scaling_verdicts(args, models: dict, s_max: int) -> list[str]:
    """The loop-scaling target per looped model and decoding-step count: does the solve rate rise from S = 1 to the
    training S_max, and stay within one standard error of its S_max value at every scored S up to 2 x S_max?"""
    lines = ["| loop scaling: model | decoding steps | S = 1 -> S_max | worst S in (S_max, 2 S_max] | one s.e. | "
             "verdict |", "|---|---|---|---|---|---|"]
    for model, m in models.items():
        if model not in LOOPED:
            continue
        for d in args.decode_steps:
            cells = {s: v[0] for s, v in solve_rates(m, d).items()}
            beyond = [s for s in cells if s_max < s <= 2 * s_max]
            if 1 not in cells or s_max not in cells or not beyond:
                continue
            at_max = cells[s_max]
            se = binomial_se(at_max, args, len(m["seeds"]), floor=1e-4)
            worst = min(beyond, key=cells.get)
            held = cells[s_max] > cells[1] and cells[worst] >= at_max - se
            lines.append(f"| {model} | {d} | {100 * cells[1]:.1f} -> {100 * at_max:.1f}% | S = {worst}: "
                         f"{100 * cells[worst]:.1f}% | {100 * se:.1f} | {'holds' if held else 'misses'} |")
    return lines


def plots(args, models: dict, slug: str) -> list[str]:
    try:
        from loopdlm.eval.plots import plot_lines
    except ImportError:  # matplotlib is an optional extra
        return []
    paths = []
    for d in ([] if args.task == LM else args.decode_steps):
        series = {}
        for model, m in models.items():
            if model in LOOPED:
                vals = [m["accuracy"][f"{d}|{s}"] for s in grid_loops(args, d)]
                series[model] = (grid_loops(args, d), [v[0] for v in vals], [v[1] for v in vals])
        baseline = models.get("mdm", {}).get("accuracy", {}).get(f"{d}|1")
        paths.append(str(plot_lines(
            series, IMAGES / f"study_{slug}_{args.steps}_solve_{d}steps.png", "inference loops S",
            f"solve rate ({args.n} held-out)", f"{args.task}: solve rate vs S, {d} decoding steps", logx=True,
            hline=(baseline[0], "MDM (same size, equal updates)") if baseline else None)))
    series = {}
    for model, m in models.items():
        s = "4" if "4" in m["final_val"] else "1"
        curves = list(m["val_curves"].values())
        steps = sorted(set.intersection(*[{p[0] for p in c[s]} for c in curves]))
        rows = [{p[0]: p for p in c[s]} for c in curves]
        series[f"{model} (S={s})"] = ([sum(r[k][1] for r in rows) / len(rows) / 1e12 for k in steps],
                                      [sum(r[k][2] for r in rows) / len(rows) for k in steps], None)
    unit = "char" if args.task == LM else "answer token"
    paths.append(str(plot_lines(series, IMAGES / f"study_{slug}_{args.steps}_val_flops.png", "training TFLOP",
                                f"validation NELBO (nats / {unit})", f"{args.task}: NELBO vs training FLOPs")))
    return paths


if __name__ == "__main__":
    main()
