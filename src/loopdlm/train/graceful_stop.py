"""Ctrl-C / SIGTERM during training: finish the current step, save a checkpoint, stop.

The first SIGINT or SIGTERM only raises a flag the training loop reads after each step; a repeat of a signal
raises KeyboardInterrupt at once (an interrupted checkpoint write never replaces the previous one). Under torchrun
repeats are not counted: torchrun forwards every signal it receives to its workers (so Ctrl-C arrives twice) and
kills them itself 30 s after forwarding.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """`with GracefulStop() as stop:` installs the handlers (main thread only; elsewhere `requested` stays None)
    and restores the previous ones on exit. `requested` is the first signal received, or None."""

    def __init__(self):
        self.requested: signal.Signals | None = None
        self._previous: dict[int, object] = {}
        self._repeat_exits = "TORCHELASTIC_RUN_ID" not in os.environ

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum)
            again = "; send it again to exit at once" if self._repeat_exits else ""
            logger.warning("%s received: saving a checkpoint after this step, then stopping%s",
                           self.requested.name, again)
        elif self._repeat_exits:
            raise KeyboardInterrupt
