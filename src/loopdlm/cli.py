"""`loopdlm` command line: prepare, train, eval, sample (and the commands other modules register).

Every user error ends as one line on stderr and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from loopdlm.errors import UserError, os_error_text

#: Modules under loopdlm.commands, each named after its command ('-' written '_') and exposing
#: `register(subparsers)`, which sets `func` on its parser.
COMMANDS = ["config", "prepare", "train", "eval", "sample", "finetune", "eval_task", "attention", "train_judge",
            "genppl", "train_codd", "lm_eval", "export"]


#: File-system failures a user fixes (full disk, read-only or unwritable folder, a file where a folder belongs):
#: one line and exit 2 wherever they surface. Writers clean up their temporary files, so nothing saved is lost.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                      errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option's help that has a default worth printing and does not already say
    what its default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and usage errors on one line (exit code 2, like every user error)."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = Parser(prog="loopdlm", description="Looped masked diffusion language models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"loopdlm.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code (0 ok, 2 user error, 128 + signal number interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed on one line
        return exit_.code
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except UserError as exc:
        print(f"loopdlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"loopdlm {args.command}: error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a TrainingStopped says what it saved and carries 128 + its signal
        detail = f": {exc}" if str(exc) else ""
        print(f"loopdlm {args.command}: interrupted{detail}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
