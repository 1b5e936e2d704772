"""WINO+ end to end on a task checkpoint: record verified WINO decodes of training prompts, fine-tune on them (with
the supervised task loss mixed in and early stopping on held-out training prompts), then compare plain threshold
decoding of the fine-tuned model with WINO and threshold decoding of the original, on held-out val prompts.

    python bench/bench_wino_plus.py CHECKPOINT --task sudoku4 [--record-prompts 768] [--heldout 128] [--examples 256]
                                    [--steps 160] [--lr 1e-4] [--threads 1] [--json FILE] [--plot FILE] [--no-write]

Prompts: WINO+ trajectories and the supervised anchor come from --record-prompts training-split prompts, early
stopping scores --heldout other training-split prompts (never the evaluation prompts), and every sampler is
measured on --examples distinct val-split prompts (the split is a hash of the prompt, so the sets are disjoint;
the script checks it). The early-stopping score is threshold-decoding accuracy minus 0.01 per forward pass (one
point of accuracy is worth one pass), and the starting weights compete too. Results go to the `bench-wino-plus`
section of docs/benchmarks.md (unless --no-write) and the plot to --plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decoding import TABLE_HEADER, Measurement, measure, paired_difference  # noqa: E402
from report import markdown_table, write_section  # noqa: E402

from loopdlm.data.task_source import encode_task, split_of, task_examples  # noqa: E402
from loopdlm.data.task_spec import get_task  # noqa: E402
from loopdlm.sampling import SamplerConfig  # noqa: E402
from loopdlm.train.wino_plus import (  # noqa: E402
    RECORDING_SPEC,
    EarlyStopping,
    SupervisedAnchor,
    build_rows,
    finetune_wino_plus,
    record_trajectories,
)
from loopdlm.workflow import build_objective, load_pretrained, resolve_device  # noqa: E402

DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "wino_plus.png"
THRESHOLDS = (0.95, 0.9, 0.7, 0.5)
#: The fine-tuned model's sweep is finer: equal-accuracy comparisons need its curve at many accuracies.
STUDENT_THRESHOLDS = (0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
WINO_TAU1 = (0.9, 0.7, 0.5)
#: Early-stopping score = accuracy - NFE_PENALTY * forward passes per example.
NFE_PENALTY = 0.01


def nfe_to_reach(curve: list[Measurement], accuracy: float) -> float | None:
    """Forward passes per example at which `curve` first reaches `accuracy`, interpolating linearly between its
    points sorted by NFE (a point less accurate than a cheaper one is dominated and skipped); None if never."""
    best: tuple[float, float] | None = None
    for nfe, acc in sorted((m.nfe, m.accuracy) for m in curve):
        if acc >= accuracy:
            if best is None:
                return nfe
            return best[0] + (nfe - best[0]) * (accuracy - best[1]) / (acc - best[1])
        if best is None or acc > best[1]:
            best = (nfe, acc)
    return None


def comparison_lines(wino: list[Measurement], student: list[Measurement], base: list[Measurement]) -> list[str]:
    """The WINO+ target checked at equal accuracy: for every WINO setting (and every plain-threshold setting of the
    original), the NFE the WINO+ threshold curve needs for the same accuracy, and the nearest measured WINO+ point."""
    lines, verdicts = [], []
    for reference, kind in [(w, "WINO") for w in sorted(wino, key=lambda m: m.nfe)] + \
                           [(b, "threshold") for b in sorted(base, key=lambda m: m.nfe)]:
        needed = nfe_to_reach(student, reference.accuracy)
        nearest = min(student, key=lambda m: (abs(m.accuracy - reference.accuracy), m.nfe))
        d, d_se = paired_difference(nearest, reference)
        if kind == "WINO":
            verdicts.append(needed is not None and needed < reference.nfe)
        reach = (f"WINO+ threshold reaches it at {needed:.2f} NFE (interpolated)" if needed is not None
                 else "WINO+ threshold never reaches it")
        lines.append(f"vs {reference.label} on the original ({reference.accuracy:.3f} at {reference.nfe:.2f} NFE): "
                     f"{reach}; nearest measured: {nearest.label}, {nearest.accuracy:.3f} at {nearest.nfe:.2f} NFE "
                     f"(paired accuracy difference {d:+.3f} ± {d_se:.3f}).")
    verdict = "met" if verdicts and all(verdicts) else ("partly met" if any(verdicts) else "missed")
    return [f"WINO+ threshold decoding needs fewer NFE than WINO at equal accuracy: **{verdict}** — at the accuracy "
            f"of {sum(verdicts)} of {len(verdicts)} WINO settings (curves compared by linear interpolation; with "
            f"~{student[0].stderr:.2f} standard error per point, differences under ~2 points are not resolved)."
            ] + lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a `loopdlm finetune` run or step folder")
    parser.add_argument("--task", required=True, help="the task the checkpoint was fine-tuned on, e.g. sudoku4")
    parser.add_argument("--record-prompts", type=int, default=768, help="training-split prompts decoded with WINO")
    parser.add_argument("--temperatures", default="0,0.25,0.5", help="WINO retry temperatures, comma-separated")
    parser.add_argument("--heldout", type=int, default=128, help="training-split prompts for early stopping")
    parser.add_argument("--examples", type=int, default=256, help="val prompts every sampler is measured on")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32, help="WINO+ rows (and as many anchor rows) per step")
    parser.add_argument("--anchor-weight", type=float, default=1.0, help="weight of the supervised task NELBO")
    parser.add_argument("--every", type=int, default=40, help="steps between early-stopping scores")
    parser.add_argument("--stop-threshold", type=float, default=0.9, help="threshold decoded for the score")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write every measurement and the training log here")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="PNG (needs matplotlib; '' to skip)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_pretrained(args.checkpoint, resolve_device(args.device))
    model, tokenizer = loaded.model, loaded.tokenizer
    task = get_task(args.task)
    record_set = task_examples(task, args.record_prompts, args.seed, "train", unique=True)
    recorded_prompts = {e.prompt for e in record_set}
    heldout = [e for e in task_examples(task, args.heldout + args.record_prompts, args.seed + 1, "train", unique=True)
               if e.prompt not in recorded_prompts][:args.heldout]
    examples = task_examples(task, args.examples, args.seed, "val", unique=True)
    assert all(split_of(e.prompt) == "train" for e in record_set + heldout)
    assert not {e.prompt for e in examples} & (recorded_prompts | {e.prompt for e in heldout})

    def threshold(tau: float) -> SamplerConfig:
        return SamplerConfig.from_flags(sampler="threshold", threshold=tau, temperature=0.0)

    def run(net, family: str, label: str, spec: SamplerConfig, prompts=examples) -> Measurement:
        m = measure(net, tokenizer, task, prompts, spec, family, label, "fixed S_max", seed=args.seed)
        if prompts is examples:
            print(" | ".join(m.row()), flush=True)
        return m

    # 1. Record verified WINO decodes of the training prompts.
    started = time.perf_counter()
    temperatures = tuple(float(t) for t in args.temperatures.split(","))
    trajectories = record_trajectories(model, task, tokenizer, record_set, temperatures=temperatures, seed=args.seed)
    record_s = time.perf_counter() - started
    rows = build_rows(trajectories, tokenizer.mask_id)
    by_temperature = {t: sum(tr.temperature == t for tr in trajectories) for t in temperatures}
    mean_steps = sum(tr.steps for tr in trajectories) / len(trajectories)
    print(f"recorded {len(trajectories)}/{len(record_set)} verified trajectories in {record_s:.0f}s "
          f"(per temperature {by_temperature}), {mean_steps:.2f} steps each, {len(rows)} rows", flush=True)

    # 2. Fine-tune a copy with the supervised anchor and early stopping on the held-out training prompts.
    task_rows = encode_task(task, record_set, tokenizer)
    anchor = SupervisedAnchor(task_rows.tokens, ~task_rows.prompt_mask, build_objective(loaded.config,
                                                                                        tokenizer.mask_id),
                              weight=args.anchor_weight, batch_size=args.batch_size)

    def heldout_score(net) -> float:
        m = run(net, "held-out", "", threshold(args.stop_threshold), heldout)
        print(f"  held-out: accuracy {m.accuracy:.3f} NFE {m.nfe:.2f}", flush=True)
        return m.accuracy - NFE_PENALTY * m.nfe

    stopping = EarlyStopping(heldout_score, every=args.every)
    student = copy.deepcopy(model)
    started = time.perf_counter()
    history = finetune_wino_plus(student, rows, tokenizer.mask_id, steps=args.steps, lr=args.lr,
                                 batch_size=args.batch_size, seed=args.seed, anchor=anchor, early_stopping=stopping)
    train_s = time.perf_counter() - started
    print(f"fine-tuned {len(history)} steps in {train_s:.0f}s; held-out scores {stopping.scores}; kept step "
          f"{stopping.best_step}", flush=True)

    # 3. Measure on the val prompts.
    base = [run(model, "threshold (original)", f"threshold tau={tau}", threshold(tau)) for tau in THRESHOLDS]
    wino = [run(model, "WINO (original)", f"wino tau1={tau1} tau2=0.9",
                SamplerConfig.from_flags(sampler="wino", tau1=tau1, tau2=0.9, temperature=0.0)) for tau1 in WINO_TAU1]
    after = [run(student, "WINO+ threshold", f"WINO+ threshold tau={tau}", threshold(tau))
             for tau in STUDENT_THRESHOLDS]

    if args.json:
        Path(args.json).write_text(json.dumps({
            "measurements": [asdict(m) for m in base + wino + after], "history": history,
            "early_stopping": stopping.scores, "kept_step": stopping.best_step,
            "trajectories": len(trajectories), "rows": len(rows)}))
    if args.plot:
        from loopdlm.eval.plots import plot_lines

        series = {}
        for group in (base, wino, after):
            ordered = sorted(group, key=lambda m: m.nfe)
            series[group[0].family] = ([m.nfe for m in ordered], [m.accuracy for m in ordered],
                                       [m.stderr for m in ordered])
        print("plot:", plot_lines(series, Path(args.plot), "forward passes per example (NFE)",
                                  "accuracy (exact, verified)",
                                  f"{task.name}: WINO+ ({len(examples)} val prompts, S_max, greedy)"))

    steps_logged = [h for h in history if "nelbo" in h]
    first, last = steps_logged[:10], steps_logged[-10:]

    def mean(key: str, part: list[dict]) -> float:
        return sum(h[key] for h in part) / len(part)

    targets = comparison_lines(wino, after, base)
    body = (f"Checkpoint `{loaded.path}`, task {task.name}. Recording: WINO (tau1 {RECORDING_SPEC.wino.tau1}, tau2 "
            f"{RECORDING_SPEC.wino.tau2}) on {len(record_set)} train-split prompts, retried at temperatures "
            f"{list(temperatures)}: {len(trajectories)} verified ({by_temperature}), {mean_steps:.2f} steps each, "
            f"{len(rows)} training rows, {record_s:.0f} s. Fine-tuning: AdamW lr {args.lr}, {args.batch_size} WINO+ "
            f"rows + {args.batch_size} supervised task rows (weight {args.anchor_weight}) per step, S ~ U{{1..S_max}}, "
            f"{len(history)} of {args.steps} steps in {train_s:.0f} s; WINO+ CE {mean('ce', first):.3f} -> "
            f"{mean('ce', last):.3f}, task NELBO {mean('nelbo', first):.3f} -> {mean('nelbo', last):.3f} "
            f"(means of the first / last 10 steps). Early stopping on {len(heldout)} other train-split prompts "
            f"(threshold {args.stop_threshold}; score = accuracy - {NFE_PENALTY} x NFE): "
            + ", ".join(f"step {s}: {v:.3f}" for s, v in stopping.scores)
            + f"; kept step {stopping.best_step}.\n\n"
            f"Evaluation on {len(examples)} distinct val prompts (the bench-decoding prompts), greedy, S = S_max:\n\n"
            + markdown_table(TABLE_HEADER[1:], [m.row()[1:] for m in base + wino + after])
            + "\n\nTargets:\n\n" + "\n".join(f"- {line}" for line in targets))
    print(body)
    if not args.no_write:
        write_section("bench-wino-plus", body)


if __name__ == "__main__":
    main()
