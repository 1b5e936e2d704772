"""`loopdlm finetune`: supervised training on a task's answers (prompt always visible), from scratch or from a
pretrained checkpoint; looped models keep drawing S ~ U{1..S_max} per step."""

from __future__ import annotations

from loopdlm.commands.arguments import positive_int
from loopdlm.config import apply_overrides, available_presets, load_config
from loopdlm.data.task_source import (
    TASK_SOURCE_PREFIX,
    TaskBatchSource,
    encode_task,
    task_examples,
    task_tokenizer,
)
from loopdlm.data.file_tasks import FileTask
from loopdlm.data.task_spec import get_task, portable_spec
from loopdlm.data.tokenizers import load_tokenizer
from loopdlm.errors import UserError
from loopdlm.train.checkpoint import TOKENIZER_DIR, load_checkpoint_config, resolve_checkpoint
from loopdlm.train.distributed import setup_distributed
from loopdlm.train.trainer import Trainer
from loopdlm.workflow import absolute_paths, build_model, build_training_objective, set_torch_threads


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
    config.data.source = TASK_SOURCE_PREFIX + portable_spec(args.task)
    config.data.tokenizer = tokenizer.kind
    config.data.seq_len = sum(task.row_widths(tokenizer))
    # A task file gives all of its split by default; a generated task as many as asked.
    from_file = isinstance(task, FileTask)
    train_count = args.train_examples if args.train_examples is not None else (None if from_file else 20000)
    val_count = args.val_examples if args.val_examples is not None else (None if from_file else 256)

    absolute_paths(config)
    dist = setup_distributed(config.train.device)
    set_torch_threads(config.train.threads)
    seed, batch = config.train.seed, config.train.batch_size
    train_examples = task_examples(task, train_count, seed, "train")
    val_examples = task_examples(task, val_count, seed, "val", unique=True)
    unanswered = sum(not e.answer for e in train_examples + val_examples)
    if unanswered:
        raise UserError(f"{unanswered} {task.name} examples have no answer (e.g. puzzles without a solution); "
                        "finetune needs answers")
    if len(train_examples) < batch * dist.world_size:
        raise UserError(f"{len(train_examples)} training examples cannot fill a batch of {batch} x {dist.world_size}")
    train_rows = encode_task(task, train_examples, tokenizer)
    val_rows = encode_task(task, val_examples, tokenizer)
    val_batch = max(1, min(batch, len(val_examples) // dist.world_size))
    model = build_model(config.model, tokenizer.vocab_size, seed=config.train.seed)
    objective = build_training_objective(config, tokenizer.mask_id)
    trainer = Trainer(config, model, objective,
                      TaskBatchSource(train_rows, batch, seed, dist.rank, dist.world_size),
                      TaskBatchSource(val_rows, val_batch, seed + 1, dist.rank, dist.world_size),
                      config.train.out_dir, tokenizer=tokenizer, dist=dist)
    result = trainer.fit()
    if dist.is_main:
        print(f"fine-tuned on {task.name} ({len(train_examples)} examples, rows of {config.data.seq_len} tokens, "
              f"answer-only loss) for {result.step} steps -> {result.checkpoint}")
        for loops, values in sorted(result.eval_metrics.items()):
            print(f"  val S={loops}: {values['nats_per_token']:.4f} nats/answer token")
