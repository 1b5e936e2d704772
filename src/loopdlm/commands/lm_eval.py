"""`loopdlm lm-eval ARGS...`: lm-evaluation-harness's command line with the `loopdlm` model registered.

lm-eval 0.4.13 discovers no out-of-tree models, so this forwards every argument unchanged to its CLI after the
registering import (`loopdlm.integrations.lm_eval`); it needs `pip install loopdlm[eval]`.
"""

from __future__ import annotations

import argparse

from loopdlm.errors import UserError


def register(subparsers) -> None:
    # '+' as the only option prefix hands every '--flag' through untouched to lm-eval's own parser.
    parser = subparsers.add_parser("lm-eval", prefix_chars="+", add_help=False,
                                   help="run lm-evaluation-harness with the `loopdlm` model registered")
    parser.add_argument("harness_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")
    parser.set_defaults(func=run)


def run(args) -> None:
    try:
        from loopdlm.integrations.lm_eval import run_harness
    except ImportError as exc:
        raise UserError(f"lm-eval is not installed ({exc}); pip install 'loopdlm[eval]'") from None
    run_harness(args.harness_args)
