"""SIGTERM and SIGINT during training: finish the optimizer step in flight, save a checkpoint, stop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: a checkpoint was saved and the run stopped."""

    def __init__(self, signum: int, saved: Path):
        super().__init__(f"stopped by signal {signum} after saving {saved}")
        self.signum, self.saved = signum, saved


class StopSignals:
    """While active, SIGTERM and SIGINT are recorded in `signum` instead of stopping the process: the loop
    finishes the optimizer step in flight, saves a checkpoint and stops (signals only reach the main thread)."""

    def __init__(self):
        self.signum, self._previous = 0, {}

    def _record(self, signum, _frame) -> None:
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
