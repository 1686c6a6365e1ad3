"""SIGTERM and SIGINT during training: finish the optimizer step in flight, save a checkpoint, stop. SIGUSR1 (not on
Windows): every thread's stack to stderr, the run going on (where a run that seems stuck is waiting)."""

from __future__ import annotations

import faulthandler
import io
import signal
import sys
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


def stacks_on_sigusr1() -> bool:
    """`kill -USR1 PID` writes every thread's Python stack to the process's stderr (its log) and the process goes
    on. Returns whether it is set up (there is no SIGUSR1 on Windows)."""
    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        return False
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
    except (AttributeError, ValueError, io.UnsupportedOperation):  # a stderr with no file (captured, a notebook)
        return False
    return True
