"""`loopdlm eval`: the held-out NELBO bound of a checkpoint at several loop counts S.

A checkpoint made by `finetune` is scored on its task's examples (answer tokens only, prompts always visible),
the bound its validation reports; any other checkpoint on its corpus split.
"""

from __future__ import annotations

import json

from loopdlm.data.task_source import task_from_source, task_nelbo_batches
from loopdlm.errors import UserError
from loopdlm.eval.likelihood import likelihood_bound
from loopdlm.workflow import (
    CorpusBatchSource,
    build_objective,
    checkpoint_corpus_split,
    load_pretrained,
    resolve_device,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="validation NELBO bound at several loop counts")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--loops", type=int, nargs="+", default=None, help="loop counts S (default: config)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1, help="t-samples per batch (K)")
    parser.add_argument("--split", choices=["train", "val"], default="val")
    parser.add_argument("--block-size", type=int, default=None, help="score with block diffusion of this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def run(args) -> None:
    loaded = load_pretrained(args.checkpoint, resolve_device(args.device))
    config = loaded.config
    loops = args.loops or (config.sample.eval_loops if loaded.model.config.core_layers else [1])
    if min(loops) < 1:
        raise UserError(f"--loops values must be >= 1, got {loops}")
    if args.batches < 1 or args.samples < 1:
        raise UserError("--batches and --samples must be >= 1")
    if args.block_size is not None:
        config.diffusion.block_size = args.block_size
    # reported likelihoods always use the unclipped noise interval
    config.diffusion.clip_low, config.diffusion.clip_high = 0.0, 1.0
    task = task_from_source(config.data.source)
    if task is not None:
        batches = task_nelbo_batches(task, loaded.tokenizer, args.split, args.batches * args.batch_size,
                                     args.batch_size, args.seed)
        scored = f"{task.name} answers"
    else:
        dataset = checkpoint_corpus_split(config.data, loaded.tokenizer, args.split)
        source = CorpusBatchSource(dataset, args.batch_size, seed=args.seed)
        batches = [source.next_batch()
                   for _ in range(min(args.batches, max(1, dataset.num_sequences // args.batch_size)))]
        scored = "tokens"
    objective = build_objective(config, loaded.tokenizer.mask_id)
    reports = [likelihood_bound(loaded.model, objective, batches, s, args.samples, args.seed) for s in loops]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports]))
        return
    print(f"# {loaded.path} | {args.split} split, {reports[0].tokens} {scored}, K={args.samples}")
    print(f"{'S':>4} {'nats/token':>11} {'bits/token':>11} {'PPL <=':>9}")
    for r in reports:
        print(f"{r.loops:>4} {r.nats_per_token:>11.4f} {r.bits_per_token:>11.4f} {r.perplexity_bound:>9.3f}")
