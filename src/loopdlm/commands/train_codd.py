"""`loopdlm train-codd`: fit a CoDD HMM prior to a trained checkpoint and save it as a layer of its own; `--out` is
the run folder, so re-running the command resumes."""

from __future__ import annotations

from loopdlm.commands.arguments import DEVICE_HELP, SEED_HELP, non_negative_int, positive_float, positive_int
from loopdlm.train.codd_training import CoDDTrainConfig, train_codd_from_checkpoint


def register(subparsers) -> None:
    """Add the `train-codd` subcommand; its handler is `run`."""
    defaults = CoDDTrainConfig()
    parser = subparsers.add_parser("train-codd", help="train a CoDD coupling prior (HMM) for a checkpoint")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder (the frozen model)")
    parser.add_argument("--out", required=True, help="folder to write the prior into (use it with sample --codd); "
                        "also the run folder: the same command again resumes an interrupted run, more --steps "
                        "extend a finished one")
    parser.add_argument("--states", type=positive_int, default=defaults.n_states, help="HMM hidden states N")
    parser.add_argument("--window", type=positive_int, default=defaults.window,
                        help="W: positions per HMM window; use the sampler's block length")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="Adam steps")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr, help="Adam learning rate on the HMM logits")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="training sequences per step and process")
    parser.add_argument("--loops", type=non_negative_int, default=0,
                        help="core applications S of the frozen model (0 = S_max)")
    parser.add_argument("--topk", type=non_negative_int, default=defaults.topk,
                        help="cache the frozen model's top-k log-probs of a pool of noisy batches (0 = recompute "
                             "every step)")
    parser.add_argument("--pool-batches", type=positive_int, default=defaults.pool_batches,
                        help="noisy batches in the top-k cache (with --topk)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=SEED_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.set_defaults(func=run)


def run(args) -> None:
    """Handler: train and save the prior described by the parsed arguments."""
    config = CoDDTrainConfig(n_states=args.states, window=args.window, steps=args.steps, lr=args.lr, topk=args.topk,
                             pool_batches=args.pool_batches, seed=args.seed)
    train_codd_from_checkpoint(args.checkpoint, args.out, config, batch_size=args.batch_size, loops=args.loops,
                               device=args.device)
