"""`loopdlm attention`: masked-query attention on masked vs unmasked keys per layer application and noise level,
as a table (or JSON) and optionally a plot."""

from __future__ import annotations

import json

import torch

from loopdlm.commands.arguments import DEVICE_HELP, SEED_HELP, number, positive_int
from loopdlm.data.batches import RowSource
from loopdlm.data.task_source import encode_task, task_examples, task_of, task_rows
from loopdlm.data.task_spec import get_task
from loopdlm.eval.attention import analyze_attention
from loopdlm.settings import Range
from loopdlm.workflow import checkpoint_corpus_split, load_pretrained, resolve_device

DEFAULT_TIMES = [0.1, 0.3, 0.5, 0.7, 0.9]


def register(subparsers) -> None:
    parser = subparsers.add_parser("attention", help="attention from masked queries to masked/unmasked keys")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--out", default=None, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--task", default=None, help="analyse on task problems (default: the checkpoint's task, "
                        "else validation text of its corpus)")
    parser.add_argument("--times", type=number(float, Range(0, 1, low_open=True)), nargs="+", default=DEFAULT_TIMES,
                        help="noise levels t in (0, 1]")
    parser.add_argument("--loops", type=positive_int, default=None,
                        help="core applications S (default: training S_max)")
    parser.add_argument("--n", type=positive_int, default=64, help="sequences (or problems) to average over")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.set_defaults(func=run)


def run(args) -> None:
    loaded = load_pretrained(args.checkpoint, resolve_device(args.device), denoiser=True)
    loops = args.loops or loaded.model.config.max_loops
    batches = _batches(args, loaded)
    records = analyze_attention(loaded.model, batches, loaded.tokenizer.mask_id, args.times, loops, seed=args.seed)
    if args.out:
        from loopdlm.eval.plots import plot_attention

        plot_attention(records, args.out, title=f"{loaded.path.parent.parent.name}: S={loops}")
    if args.json:
        print(json.dumps([r.as_dict() for r in records]))
        return
    print(f"# {loaded.path} | S={loops} | mean over masked queries and heads; share = masked-key fraction")
    print(f"{'t':>5} {'layer':>5} {'loop':>4} {'masked':>7} {'unmasked':>8} {'self':>6} {'share':>6} {'lift':>5}")
    for r in records:
        print(f"{r.t:>5.2f} {r.layer:>5} {r.loop:>4} {r.masked_mass:>7.3f} {r.unmasked_mass:>8.3f} "
              f"{r.self_mass:>6.3f} {r.masked_key_fraction:>6.3f} {r.lift:>5.2f}")
    if args.out:
        print(f"plot -> {args.out}")


def _batches(args, loaded) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Clean batches (x0, noisable): held-out task problems (answer region noisable) or validation text."""
    task = get_task(args.task) if args.task else task_of(loaded.config.data)
    size = min(args.batch_size, args.n)
    if task is not None:
        rows = encode_task(task, task_examples(task, args.n, args.seed, "test", unique=True), loaded.tokenizer)
        source = RowSource(task_rows(rows), size, args.seed)
    else:
        source = RowSource(checkpoint_corpus_split(loaded.config.data, loaded.tokenizer, "val"), size, args.seed)
    return [source.next_batch() for _ in range(max(1, args.n // size))]
