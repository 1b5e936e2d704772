"""`loopdlm finetune`: supervised training on a task's answers (prompt always visible), from scratch or from a
pretrained checkpoint; looped models keep drawing S ~ U{1..S_max} per step."""

from __future__ import annotations

from loopdlm.commands.arguments import positive_int
from loopdlm.config import apply_overrides, available_presets, load_config
from loopdlm.data.task_source import task_tokenizer
from loopdlm.data.task_spec import get_task, portable_spec
from loopdlm.data.tokenizers import load_tokenizer
from loopdlm.train.checkpoint_files import TOKENIZER_DIR, load_checkpoint_config, resolve_checkpoint
from loopdlm.workflow import build_run


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="train on task answers (answer-only masking)")
    parser.add_argument("--task", required=True, help="task spec, e.g. sudoku4, add:digits=3, gsm8k:path=F, "
                        "jsonl:path=F,prompt=question,answer=answer[,verify=exact|number|sudoku], sudoku:path=F")
    parser.add_argument("--config", required=True, help=f"preset ({', '.join(available_presets())}) or YAML file")
    parser.add_argument("--init", default=None, help="start from this checkpoint's (EMA) weights; its model config "
                        "and tokenizer are used (same as train.init_from)")
    parser.add_argument("--train-examples", type=positive_int, default=None,
                        help="training examples (train split; default 20000, a task file: all of its train split)")
    parser.add_argument("--val-examples", type=positive_int, default=None,
                        help="distinct validation examples (val split; default 256, a task file: all of its val split)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=500 model.max_loops=6")
    parser.set_defaults(func=run)


def run(args) -> None:
    config = load_config(args.config, args.overrides)
    task = get_task(args.task)
    if args.init:
        config.train.init_from = args.init
    if config.train.init_from:
        folder = resolve_checkpoint(config.train.init_from)
        tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
        # The weights decide the architecture; only loop settings (which own no weights) may still be overridden.
        config.model = load_checkpoint_config(folder).model
        apply_overrides(config, [o for o in args.overrides if o.startswith("model.")])
        config.validate()
    else:
        tokenizer = task_tokenizer(task)
    config.data.task = portable_spec(args.task)
    training = build_run(config, tokenizer=tokenizer, examples=(args.train_examples, args.val_examples))
    result = training.trainer.fit()
    if training.dist.is_main:
        print(f"fine-tuned on {task.name} ({training.train_examples} examples, rows of {training.config.data.seq_len} tokens, "
              f"answer-only loss) for {result.step} steps -> {result.checkpoint}")
        for loops, values in sorted(result.eval_metrics.items()):
            print(f"  val S={loops}: {values['nats_per_token']:.4f} nats/answer token")
