"""`loopdlm train`: train a (looped) masked diffusion model from a preset or YAML config plus overrides."""

from __future__ import annotations

from loopdlm.config import available_presets, load_config
from loopdlm.train.distributed import setup_distributed
from loopdlm.train.trainer import Trainer, format_validation
from loopdlm.workflow import build_model, build_objective, corpus_sources, prepare_data_distributed


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (also under torchrun for DDP/FSDP)")
    parser.add_argument("--config", required=True, help=f"preset ({', '.join(available_presets())}) or YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 model.max_loops=6")
    parser.set_defaults(func=run)


def run(args) -> None:
    config = load_config(args.config, args.overrides)
    dist = setup_distributed(config.train.device)
    corpus = prepare_data_distributed(config.data, dist)
    tokenizer = corpus.tokenizer
    model = build_model(config.model, tokenizer.vocab_size)
    objective = build_objective(config, tokenizer.mask_id)
    train_source, val_source = corpus_sources(corpus, config, dist)
    trainer = Trainer(config, model, objective, train_source, val_source, config.train.out_dir,
                      tokenizer_saver=tokenizer.save, dist=dist)
    result = trainer.fit()
    if dist.is_main:
        print(f"trained {result.step} steps -> {result.checkpoint}")
        for loops, values in sorted(result.eval_metrics.items()):
            print(f"validation S={loops}: {format_validation(values)}")
