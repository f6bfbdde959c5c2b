"""The run directory: checked before any work and held by one run at a time.

`RunDirectory(path)` creates the directory if needed, proves it writable and takes an
exclusive lock (`flock` on `.petra.lock`, which names the holder). A second run or resume
of the same directory is refused at once with the holder's pid and start time; the
kernel drops the lock when its process dies, however it dies, so a stale lock is taken
over without any guessing. A directory this call created is removed again when the run
fails before writing anything into it.

Nothing of the user's is written over: a directory that already holds anything petra did
not write there (an export, a folder with its own config.json) is refused, naming what is
there (`ours` says which entries are petra's).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from .config import ConfigError

LOCK = ".petra.lock"

try:
    import fcntl
except ImportError:  # not POSIX: no lock, everything else works
    fcntl = None


class RunDirectoryInUse(ConfigError):
    """Another live process holds the run directory."""


# what a run directory holds (trackers: TensorBoard's and wandb's folders)
RUN_FILES = {
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "tokenizer.json",
    "tokenizer.model",
    "checkpoint.pt",
    "checkpoint.pt.tmp",
    "checkpoint-sharded",
    "checkpoint-sharded.tmp",
    "checkpoint-sharded.old",
    "tensorboard",
    "wandb",
}
COMPARE_FILES = {
    "comparison.md",
    "comparison.csv",
    "comparison.json",
    "report.html",
    "val_loss.png",
    "tune.png",
    "memory.png",
    "throughput.png",
    "lr.png",
    "tune",
    "logs",
}


def _petra_config(p: Path) -> bool:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and {"preset", "model", "data", "train", "method"} <= set(d)


def run_entry(p: Path) -> bool:
    """An entry of a run directory that petra writes."""
    kept = p.name.startswith("checkpoint-step") and p.name.endswith(".pt")  # train.keep_checkpoints
    return kept or (p.name in RUN_FILES and (p.name != "config.json" or _petra_config(p)))


def is_run(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and all(run_entry(q) or q.name == LOCK for q in p.iterdir())


def compare_entry(p: Path) -> bool:
    """An entry of a compare's directory: its outputs, its runs (a seed's run in METHOD/seed-K,
    a run moved aside as METHOD.old-N)."""
    if p.name in COMPARE_FILES or ".old-" in p.name or is_run(p):
        return True
    return p.is_dir() and all(is_run(q) or q.name == LOCK for q in p.iterdir())


def check_directory(path: Path, flag: str = "--out", ours=None, what: str = "") -> bool:
    """Create `path` if missing and prove it writable; returns whether it was created. An
    existing directory with anything `ours` does not accept is refused, untouched."""
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file, not a directory; choose a directory")
        if ours is not None and path.is_dir():
            # .petra-*: the lock, another process's write probe (torchrun's ranks check at once)
            foreign = sorted(p.name for p in path.iterdir() if not p.name.startswith(".petra") and not ours(p))
            if foreign:
                more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
                raise ConfigError(
                    f"{flag} {path} is not empty and not {what}: it holds {', '.join(foreign[:5])}{more}; "
                    f"nothing was written there: choose a new or empty directory"
                )
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a name too long, no permission, ...
        raise ConfigError(f"{flag} {path}: cannot create the directory ({e.strerror or e})") from None
    probe = path / f".petra-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {path} is not writable ({e.strerror or e})") from None
    return created


class RunDirectory:
    """Context manager: `with RunDirectory(out): ...` holds `out` for the whole run."""

    def __init__(self, path: Path, flag: str = "--out", lock: bool = True, ours=None, what: str = "a petra run"):
        self.path, self.flag, self.lock = Path(path), flag, lock
        self.ours, self.what = ours, what  # ours: which entries of an existing directory petra wrote
        self._file = None
        self._created = False

    def __enter__(self) -> RunDirectory:
        self._created = check_directory(self.path, self.flag, self.ours, self.what)
        if self.lock and fcntl is not None:
            self._acquire()
        return self

    def _acquire(self) -> None:
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            f.close()
            raise RunDirectoryInUse(
                f"{self.path} is in use by another petra process (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to end or choose "
                f"another {self.flag}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            )
        )
        f.flush()
        self._file = f

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
        if exc_type is not None and self._created and _only_lock(self.path):
            shutil.rmtree(self.path, ignore_errors=True)


def _only_lock(path: Path) -> bool:
    try:
        return {p.name for p in path.iterdir()} <= {LOCK}
    except OSError:
        return False
