"""The run's metrics file (metrics.jsonl, one JSON record per line) and the progress lines of a training run."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopdlm.errors import UserError, os_error_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: Without a progress bar (output not a terminal), a progress line at least this often besides the log_every ones.
PROGRESS_SECONDS = 30.0


class MetricsLog:
    """Appends records to `folder`/metrics.jsonl on the main rank; does nothing without a folder or elsewhere.

    kept_note: says which checkpoint survives when a write fails (for the error message).
    """

    def __init__(self, folder: Path | None, is_main: bool, kept_note: Callable[[], str] = lambda: ""):
        self.path = folder / METRICS_FILE if folder is not None and is_main else None
        self.kept_note = kept_note

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        if self.path is None:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            raise UserError(f"cannot append to {self.path}: {os_error_text(err)}; {self.kept_note()}") from None

    def start_fresh(self) -> None:
        """A run starting from scratch writes a fresh file; one left by an earlier run (killed before its first
        checkpoint, or whose checkpoints were deleted) is renamed to metrics.old-N.jsonl, never deleted."""
        path = self.path
        if path is None or not path.is_file() or path.stat().st_size == 0:
            return
        number = 1
        while (aside := path.with_name(f"{path.stem}.old-{number}{path.suffix}")).exists():
            number += 1
        os.replace(path, aside)
        logger.info("no checkpoint in %s: starting from scratch; the earlier %s was moved to %s", path.parent,
                    path.name, aside.name)

    def truncate(self, step: int) -> None:
        """Drop records past `step` (written by an interrupted run after its last checkpoint), atomically."""
        path = self.path
        if path is None or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut short when the run was killed
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temp, path)


class ProgressLines:
    """Without a progress bar: a log line with the step, loss, S and the estimated time left (from this session's
    pace) at the first step, every log record and at least every PROGRESS_SECONDS."""

    def __init__(self, is_main: bool, total_steps: int):
        self.total_steps = total_steps
        self.bar_shown = is_main and sys.stderr.isatty() and not os.environ.get("CI")
        self.silent = not is_main or self.bar_shown
        self.started, self.first_step, self.last = time.perf_counter(), 0, 0.0

    def start(self, step: int) -> None:
        """This session's training begins after `step`."""
        self.started, self.first_step = time.perf_counter(), step
        self.last = self.started

    def due(self, step: int) -> bool:
        """Whether a line is due besides the log_every ones: the first step gives a first time estimate."""
        return step == self.first_step + 1 or time.perf_counter() - self.last >= PROGRESS_SECONDS

    def line(self, step: int, stats: dict[str, Any], extra: str = "") -> None:
        self.last = time.perf_counter()
        if self.silent:
            return
        seconds_per_step = (self.last - self.started) / max(step - self.first_step, 1)
        left = duration_text(seconds_per_step * (self.total_steps - step))
        logger.info("step %d/%d loss %.4f S=%d lr %.2e%s, about %s left", step, self.total_steps, stats["loss"],
                    stats["loops"], stats["lr"], extra, left)


def format_validation(values: dict[str, Any]) -> str:
    """One validation result as text: nats/token, bits/char (when known), the perplexity bound, tokens scored."""
    per_char = f", {values['bits_per_char']:.4f} bits/char" if "bits_per_char" in values else ""
    return (f"{values['nats_per_token']:.4f} nats/token{per_char}, PPL <= {values['ppl_bound']:.2f} "
            f"({values['scored_tokens']} tokens scored)")


def duration_text(seconds: float) -> str:
    """'42s', '7m05s' or '3h12m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


__all__ = ["METRICS_FILE", "MetricsLog", "ProgressLines", "duration_text", "format_validation"]
