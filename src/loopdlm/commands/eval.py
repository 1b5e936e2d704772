"""`loopdlm eval`: the held-out NELBO bound of a checkpoint at several loop counts S, in nats/token and bits/char.

By default it scores what training's validation scored (train.eval_batches batches of train.batch_size sequences
in the same order, the same noise draws, train.eval_samples t-samples each), so the two agree; when an option
changes that, the header says which. A checkpoint made by `finetune` is scored on its task's examples (answer
tokens only, prompts always visible); any other checkpoint on its corpus split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from tqdm import tqdm

from loopdlm.commands.arguments import DEVICE_HELP, positive_int
from loopdlm.data.batches import RowSource
from loopdlm.data.task_source import task_nelbo_batches, task_of
from loopdlm.eval.likelihood import likelihood_bound, paired_difference
from loopdlm.train.trainer import derived_seed
from loopdlm.workflow import (
    SPLIT_SEED_OFFSET,
    build_objective,
    checkpoint_corpus_split,
    load_pretrained,
    resolve_device,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="validation NELBO bound at several loop counts")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--loops", type=positive_int, nargs="+", default=None,
                        help="loop counts S (default: the checkpoint's sample.eval_loops)")
    parser.add_argument("--batches", type=positive_int, default=None,
                        help="batches to score (default: the checkpoint's train.eval_batches)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="sequences per batch (default: the checkpoint's train.batch_size)")
    parser.add_argument("--samples", type=positive_int, default=None,
                        help="t-samples per batch, K (default: the checkpoint's train.eval_samples)")
    parser.add_argument("--split", choices=["train", "val"], default="val", help="corpus split to score")
    parser.add_argument("--block-size", type=positive_int, default=None,
                        help="score with block diffusion of this size (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seeds batch order and noise (default: the checkpoint's train.seed)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.set_defaults(func=run)


def run(args) -> None:
    loaded = load_pretrained(args.checkpoint, resolve_device(args.device), denoiser=True)
    config, train = loaded.config, loaded.config.train
    loops = args.loops or (config.sample.eval_loops if loaded.model.config.core_layers else [1])
    chosen = {"batches": (args.batches, train.eval_batches), "batch_size": (args.batch_size, train.batch_size),
              "samples": (args.samples, train.eval_samples), "seed": (args.seed, train.seed)}
    batches, batch_size, samples, seed = (given if given is not None else default for given, default in
                                          chosen.values())
    differences = [f"--{name.replace('_', '-')} {given}" for name, (given, default) in chosen.items()
                   if given is not None and given != default]
    if args.split != "val":
        differences.append(f"--split {args.split}")
    if args.block_size is not None and args.block_size != config.diffusion.block_size:
        differences.append(f"--block-size {args.block_size}")
        config.diffusion.block_size = args.block_size
    # reported likelihoods always use the unclipped noise interval
    config.diffusion.clip_low, config.diffusion.clip_high = 0.0, 1.0
    task = task_of(config.data)
    if task is not None:
        scored = task_nelbo_batches(task, loaded.tokenizer, args.split, batches * batch_size, batch_size, seed)
        what, characters_per_token = f"{task.name} answers", None
    else:
        dataset = checkpoint_corpus_split(config.data, loaded.tokenizer, args.split)
        # The same batch order and noise as the trainer's validation (single process: rank 0).
        source = RowSource(dataset, batch_size, seed + SPLIT_SEED_OFFSET[args.split])
        scored = [source.next_batch() for _ in range(batches)]
        what, characters_per_token = "tokens", dataset.characters_per_token(loaded.tokenizer)
    objective = build_objective(config, loaded.tokenizer.mask_id)
    with tqdm(total=len(loops) * len(scored), desc="eval", unit="batch", disable=args.json,
              dynamic_ncols=True) as bar:
        reports = []
        for s in loops:
            bar.set_postfix(S=s)
            reports.append(likelihood_bound(loaded.model, objective, _counted(scored, bar), s, samples,
                                            derived_seed("eval", seed, 0), characters_per_token))
    if args.json:
        print(json.dumps([r.as_dict() for r in reports]))
        return
    if task is not None:
        agreement = "distinct examples of the task's split (finetune's validation draws its own set)"
    elif differences:
        agreement = "differs from training's validation by " + ", ".join(differences)
    else:
        agreement = ("the batches and noise of training's final validation (single process; bf16 autocast on CUDA "
                     "there and fp32 here may differ slightly)")
    per_char = f"{characters_per_token:.3f} characters/token" if characters_per_token else "no bits/char (task)"
    print(f"# {loaded.path} | {args.split} split, {reports[0].tokens} {what} scored ({len(scored)} batches of "
          f"{batch_size}), K={samples}, {per_char} | {agreement}")
    reference = reports[0]
    print(f"{'S':>4} {'nats/token':>11} {'+- s.e.':>8} {'bits/token':>11} {'bits/char':>10} {'PPL <=':>9} "
          f"{'vs S=' + str(reference.loops) + ' (paired s.e.)':>26}")
    for r in reports:
        per_char = f"{r.bits_per_char:>10.4f}" if r.bits_per_char is not None else f"{'n/a':>10}"
        difference, error = paired_difference(r, reference)
        versus = f"{difference:+.4f} +- {error:.4f}" if r is not reference else "-"
        print(f"{r.loops:>4} {r.nats_per_token:>11.4f} {r.standard_error:>8.4f} {r.bits_per_token:>11.4f} {per_char} "
              f"{r.perplexity_bound:>9.3f} {versus:>26}")


def _counted(batches: list, bar: tqdm) -> Iterator:
    """The batches, advancing the progress bar as each is scored."""
    for batch in batches:
        yield batch
        bar.update(1)
