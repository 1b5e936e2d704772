"""An exclusive lock on a run folder, so that two trainers never write the same checkpoints and metrics.

The lock is an `flock` on out_dir/.lock, held while the trainer runs. The kernel drops it when the holding process
ends in any way (normal exit, crash, kill -9), so a lock file left behind by a dead process never blocks a new run;
the file only records the pid of its last holder, for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from loopdlm.errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    """`with RunLock(out_dir):` holds the run folder's lock; UserError (one line) when another process holds it.
    OSError from creating the lock file (read-only folder, ...) propagates to the caller."""

    def __init__(self, out_dir: str | Path):
        self.folder = Path(out_dir)
        self._handle: IO[str] | None = None

    def __enter__(self) -> RunLock:
        # 'a+' creates the file without truncating the pid a current holder wrote into it.
        handle = open(self.folder / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"another trainer (pid {holder}) is using {self.folder}; wait for it to finish or set "
                            "another train.out_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the flock
            self._handle = None
