"""`loopdlm train`: train a (looped) masked diffusion model from a preset or YAML config plus overrides."""

from __future__ import annotations

import logging
import os

from loopdlm.config import available_presets, load_config
from loopdlm.errors import UserError
from loopdlm.train.metrics import format_validation
from loopdlm.workflow import build_run

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (also under torchrun for DDP/FSDP)")
    parser.add_argument("--config", required=True, help=f"preset ({', '.join(available_presets())}) or YAML file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (same as train.threads; default: automatic)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 model.max_loops=6")
    parser.set_defaults(func=run)


def run(args) -> None:
    config = load_config(args.config, args.overrides)
    if config.data.task:
        raise UserError("data.task is set: train on a task with `loopdlm finetune --task SPEC`")
    if args.threads is not None:
        config.train.threads = args.threads
    run = build_run(config)
    config, dist, trainer = run.config, run.dist, run.trainer
    if dist.is_main:
        t, m = config.train, run.corpus.manifest
        logger.info("train: %.2fM parameters on %s x %d, %s | %s: %d tokens (%d for training), %s tokenizer with "
                    "%d ids | %d steps of %d x %d tokens | run folder %s", run.model.num_parameters() / 1e6,
                    trainer.device, dist.world_size, run.threads, config.data.source, m.num_tokens, m.val_start,
                    config.data.tokenizer, m.vocab_size, t.steps, t.batch_size * t.grad_accum * dist.world_size,
                    config.data.seq_len, os.path.abspath(t.out_dir))
    result = trainer.fit()
    if dist.is_main:
        print(f"trained {result.step} steps -> {result.checkpoint}")
        for loops, values in sorted(result.eval_metrics.items()):
            print(f"validation S={loops}: {format_validation(values)}")
