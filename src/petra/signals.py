"""SIGINT and SIGTERM during a run: noted, not obeyed at once. The loop finishes its step,
all processes agree (the flag travels in the step's all-reduce), the run saves and exits."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """While entered (in the main thread), SIGINT and SIGTERM set `signum` instead of
    killing the process; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
