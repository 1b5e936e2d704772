"""`loopdlm train-judge`: train an autoregressive judge (causal mask, next-token loss) on a corpus, for `genppl`."""

from __future__ import annotations

from loopdlm.config import available_presets, load_config
from loopdlm.errors import UserError
from loopdlm.workflow import build_run


def register(subparsers) -> None:
    parser = subparsers.add_parser("train-judge", help="train an autoregressive judge (causal mask, next-token loss)")
    parser.add_argument("--config", required=True, help=f"preset ({', '.join(available_presets())}) or YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=500")
    parser.set_defaults(func=run)


def run(args) -> None:
    config = load_config(args.config, args.overrides)
    if config.model.core_layers:
        raise UserError("a judge has no looped core: set model.core_start = model.core_end")
    if config.data.task:
        raise UserError("a judge trains on a corpus (data.source), not on a task")
    config.model.causal = True  # saved with the checkpoint, so every later load builds a causal model
    training = build_run(config)  # a causal model trains on the next-token NLL
    result = training.trainer.fit()
    if training.dist.is_main:
        print(f"trained judge {result.step} steps -> {result.checkpoint}")
        for values in result.eval_metrics.values():
            print(f"  val NLL {values['nats_per_token']:.4f} nats/token (ppl {values['ppl_bound']:.2f})")
