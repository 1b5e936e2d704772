"""`loopdlm` command line: prepare, train, eval, sample (and the commands other modules register).

Every user error ends as one line on stderr and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loopdlm.errors import UserError

#: Modules under loopdlm.commands, each exposing `register(subparsers)` which sets `func` on its parser.
COMMANDS = ["prepare", "train", "evaluate", "sample", "finetune", "eval_task", "analyze", "judge", "train_codd",
            "harness", "export"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="loopdlm", description="Looped masked diffusion language models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"loopdlm.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code (0 ok, 2 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except UserError as exc:
        print(f"loopdlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loopdlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
