"""`loopdlm eval-task`: task accuracy of a checkpoint with any sampler, at one or several loop counts S."""

from __future__ import annotations

import argparse
import json

from loopdlm.commands.arguments import DEVICE_HELP, non_negative_int, positive_int, spec_type
from loopdlm.commands.sample import add_sampler_arguments, checkpoint_decoder, sampler_spec_from_args
from loopdlm.data.file_tasks import FileTask
from loopdlm.data.task_source import SPLITS, task_examples, task_of
from loopdlm.data.task_spec import get_task
from loopdlm.errors import UserError
from loopdlm.eval.tasks import task_accuracy
from loopdlm.sampling.sampler_config import SamplerConfig
from loopdlm.workflow import load_pretrained, resolve_device


def register(subparsers) -> None:
    # 'resolve' lets this command's --loops (several values) replace the shared single-valued one.
    parser = subparsers.add_parser("eval-task", help="task accuracy with any sampler and loop count",
                                   conflict_handler="resolve")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--task", default=None, help="task spec (default: the one the checkpoint was trained on)")
    parser.add_argument("--n", type=positive_int, default=None, help="number of distinct problems (default 200; a "
                        "task file: every problem of the split)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="problems from this hash split (default test; "
                        "'all' for a file that is a test set by itself, e.g. sudoku:path=test.txt)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="problems decoded together")
    parser.add_argument("--seed", type=int, default=0, help="seeds both the problems and the sampler")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--show", type=non_negative_int, default=0, help="print this many prompt/prediction pairs")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    add_sampler_arguments(parser)
    parser.add_argument("--loops", type=positive_int, nargs="+", default=None,
                        help="core applications S, one evaluation each (default: training S_max)")
    parser.add_argument("--temperature", type=spec_type(SamplerConfig, "temperature", float), default=None,
                        help="default: the checkpoint config's (task presets decode greedily, 0)")
    parser.add_argument("--top-p", type=spec_type(SamplerConfig, "top_p", float), default=None,
                        help="default: the checkpoint config's")
    parser.set_defaults(func=run)


def run(args) -> None:
    loaded = load_pretrained(args.checkpoint, resolve_device(args.device), denoiser=True)
    task = get_task(args.task) if args.task else task_of(loaded.config.data)
    if task is None:
        raise UserError(f"checkpoint {loaded.path} was not trained on a task (data.source="
                        f"{loaded.config.data.source!r}); pass --task")
    if args.temperature is None:
        args.temperature = loaded.config.sample.temperature
    if args.top_p is None:
        args.top_p = loaded.config.sample.top_p
    loops = args.loops or [None]
    if not loaded.model.config.core_layers:
        loops = loops[:1]  # a model without a core ignores S
    count = args.n if args.n is not None else (None if isinstance(task, FileTask) else 200)
    examples = task_examples(task, count, args.seed, args.split, unique=True)
    reports = []
    for s in loops:
        decoder = checkpoint_decoder(loaded, sampler_spec_from_args(argparse.Namespace(**{**vars(args), "loops": s}),
                                                                    loaded.config), args.seed)
        reports.append((decoder, task_accuracy(decoder, loaded.tokenizer, task, examples, args.batch_size,
                                               args.seed)))
    if args.json:
        print(json.dumps([{**report.as_dict(), "loops": decoder.loops, "sampler": decoder.sampler.sampler,
                           "steps": decoder.sampler.steps} for decoder, report in reports]))
        return
    spec = reports[0][0].sampler
    print(f"# {loaded.path} | {task.name}, {len(examples)} {args.split} problems | sampler={spec.sampler} "
          f"steps={spec.steps} temperature={spec.temperature} policy={spec.loop.policy}")
    print(f"{'S':>4} {'accuracy':>9} {'+-':>6} {'NFE':>5} {'loops/row':>10} {'seconds':>8}")
    for decoder, r in reports:
        s = decoder.loops
        print(f"{s:>4} {r.accuracy:>9.3f} {r.stderr:>6.3f} {r.forward_passes:>5} {r.core_applications:>10.1f} "
              f"{r.wall_time:>8.2f}")
    for example, prediction in list(zip(examples, reports[-1][1].predictions))[:args.show]:
        verdict = "ok" if task.verify(example.prompt, prediction) else "wrong"
        print(f"{example.prompt} -> {prediction!r} ({verdict}; reference {example.answer!r})")
