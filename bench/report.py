"""Shared by the benchmarks: machine description and writing one section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    """One line naming the hardware and software the numbers were measured on."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{device}, torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads"


def command_line() -> str:
    """This process's command line as a shell command (script path relative to the working directory)."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_section(name: str, body: str, path: Path = BENCHMARKS, command: str | None = None,
                  machine_line: str | None = None) -> None:
    """Replace (or append) the section between `<!-- name:start -->` and `<!-- name:end -->` markers of the markdown
    file `path` (default docs/benchmarks.md), prefixed with the command that produced it and the machine (default:
    this process's and this machine's; pass both when rendering numbers measured elsewhere)."""
    block = (f"<!-- {name}:start -->\nCommand: `{command or command_line()}`  \nMachine: {machine_line or machine()}"
             f"\n\n{body.strip()}\n<!-- {name}:end -->")
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
