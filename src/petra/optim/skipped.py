"""Steps a device may have skipped: the step counts of an update whose gradient was not
finite (`found_inf`, known on the device only) are put back once the flag reaches the host.

An optimizer that skips on the device counts every update at once and records the step's
flag here (copied to the host asynchronously); at its next step it settles the flags of
earlier steps, by then long computed, and takes back the counts of the skipped ones. The
flag of the step in progress is never read: waiting for it would make the host wait for
backward, the sync a device-side skip exists to avoid.
"""

from __future__ import annotations

import torch


class SkippedSteps:
    def __init__(self, keys: tuple[str, ...] = ("step",)):
        self.keys = keys  # the step counts of a state (CPU tensors or ints) that a skip puts back
        # per step: (the device flag, its copy on the host, an event once the copy is done,
        # the states whose counts went up)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None, list[dict]]] = []

    def record(self, ok: torch.Tensor, states: list[dict]) -> None:
        """The states counted an update that happens only if `ok` (0-d bool) is True."""
        if self.pending and self.pending[-1][0] is ok:  # one copy of a step's flag
            self.pending[-1][3].extend(states)
            return
        if ok.is_cuda:
            flag, done = ok.to("cpu", non_blocking=True), torch.cuda.Event()
            done.record()
        else:
            flag, done = ok.clone(), None
        self.pending.append((ok, flag, done, list(states)))

    def settle(self, current: torch.Tensor | None = None) -> None:
        """Put back the counts of the skipped updates of every step but the one in progress
        (whose flag is `current`)."""
        keep = []
        for entry in self.pending:
            ok, flag, done, states = entry
            if ok is current:
                keep.append(entry)
                continue
            if done is not None:
                done.synchronize()
            if not flag.item():  # a host tensor: no sync
                for st in states:
                    for key in self.keys:
                        st[key] -= 1
        self.pending = keep

    def clear(self) -> None:
        self.pending = []
