"""SIGINT and SIGTERM during a run: noted, not obeyed at once. The loop finishes its step,
all processes agree (the signal travels in the step's all-reduce), the run saves and exits.

Requests nest: a run's request inside compare's sees a signal compare noted before the run
began (the run stops at its first step), and a signal the run notes is compare's too, so the
whole compare stops, not only the run.
"""

from __future__ import annotations

import signal
import threading

_active: list[StopRequest] = []  # entered requests, outermost first


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
        for r in _active:
            r.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            if _active:
                self.signum = _active[-1].signum
            _active.append(self)
            self._old = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._old:
            _active.remove(self)
        self._old = {}
