"""Task accuracy at equal parameters and equal training FLOPs: LoopMDM vs MDM on 4x4 sudoku and addition, and
task accuracy as a function of the inference loop count S.

Both models are the 4-layer d=128 stack of the task presets; the LoopMDM (core = layers 1-2, S ~ U{1..4}) gets
fewer updates so that its expected training FLOPs equal the MDM's. Accuracy is verified on distinct held-out
(test-split) problems, decoded greedily most-confident-first, one answer token per step (the presets' sampler).

    python experiments/tasks.py --seeds 0 1
"""

from __future__ import annotations

import argparse

from common import CLI, IMAGES, REPO, cli_json, loop_step_cost_ratio, mean_spread, run_jobs, save_json

#: task spec -> (preset, MDM steps, batch size, row length, vocabulary, held-out problems, inference loop counts);
#: sudoku decodes 16 cells one per step, so its loop sweep is shorter to keep the study within its CPU budget.
TASKS = {
    "sudoku4": ("sudoku4-tiny", 600, 32, 32, 8, 100, [1, 2, 4, 8, 16]),
    "add:digits=2": ("add-tiny", 600, 64, 9, 15, 200, [1, 2, 4, 6, 8, 12, 16, 24]),
}
MODELS = {
    "loopmdm": ["model.core_start=1", "model.core_end=3", "model.max_loops=4"],
    "mdm": ["model.core_start=0", "model.core_end=0", "model.max_loops=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--parallel", type=int, default=2, help="training jobs at a time")
    parser.add_argument("--root", default="runs/study/tasks")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    root = REPO / args.root
    runs = {}
    commands, logs = [], []
    for task in args.tasks:
        preset, steps, batch, seq_len, vocab, _, _ = TASKS[task]
        loop_steps = round(steps / loop_step_cost_ratio(seq_len, vocab=vocab))
        for model, overrides in MODELS.items():
            model_steps = loop_steps if model == "loopmdm" else steps
            for seed in args.seeds:
                out = root / f"{task.split(':')[0]}-{model}-s{seed}"
                runs[(task, model, seed)] = out
                commands.append([*CLI, "finetune", "--task", task, "--config", preset, *overrides,
                                 f"train.steps={model_steps}", f"train.batch_size={batch}",
                                 f"train.eval_every={model_steps}",
                                 f"train.ckpt_every={model_steps}", f"train.seed={seed}", "train.device=cpu",
                                 f"train.out_dir={out}"])
                logs.append(out.with_suffix(".log"))
    if not args.skip_training:
        run_jobs(commands, logs, args.parallel)

    results = {}
    for (task, model, seed), out in runs.items():
        loops = TASKS[task][6] if model == "loopmdm" else [1]
        reports = cli_json(["eval-task", "--checkpoint", str(out), "--n", str(TASKS[task][5]),
                            "--loops", *map(str, loops), "--seed", "0", "--device", "cpu", "--json"])
        results[f"{task}|{model}|{seed}"] = {r["loops"]: r for r in reports}
    summary = summarise(args.tasks, args.seeds, results)
    save_json("tasks", {"results": results, "summary": summary})
    plot(args.tasks, args.seeds, results)
    for line in summary["table"]:
        print(line)


def summarise(tasks, seeds, results) -> dict:
    table = ["| task | model | S | accuracy (mean +- half-range over seeds) | per seed |", "|---|---|---|---|---|"]
    values = {}
    for task in tasks:
        for model in MODELS:
            for s in (TASKS[task][6] if model == "loopmdm" else [1]):
                accs = [results[f"{task}|{model}|{seed}"][s]["accuracy"] for seed in seeds]
                mean, spread = mean_spread(accs)
                values[f"{task}|{model}|{s}"] = (mean, spread)
                table.append(f"| {task} | {model} | {s} | {mean:.3f} +- {spread:.3f} | "
                             + ", ".join(f"{a:.3f}" for a in accs) + " |")
    return {"accuracy": values, "table": table}


def plot(tasks, seeds, results) -> None:
    try:
        from loopdlm.eval.plots import plot_lines
    except ImportError:
        return
    for task in tasks:
        loops = TASKS[task][6]
        means = [mean_spread([results[f"{task}|loopmdm|{seed}"][s]["accuracy"] for seed in seeds]) for s in loops]
        mdm = mean_spread([results[f"{task}|mdm|{seed}"][1]["accuracy"] for seed in seeds])[0]
        name = task.split(":")[0]
        plot_lines({"LoopMDM": (loops, [m for m, _ in means], [h for _, h in means])},
                   IMAGES / f"task_{name}_loops.png", "inference loops S", "accuracy (held-out)",
                   f"{task}: accuracy vs S (trained with S ~ U{{1..4}})", logx=True,
                   hline=(mdm, "MDM (same params, same FLOPs)"))


if __name__ == "__main__":
    main()
