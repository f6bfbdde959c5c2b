"""The run directory: checked before any work and held by one run at a time.

`RunDirectory(path)` creates the directory if needed, proves it writable and takes an
exclusive lock (`flock` on `.petra.lock`, which names the holder). A second run or resume
of the same directory is refused at once with the holder's pid and start time; the
kernel drops the lock when its process dies, however it dies, so a stale lock is taken
over without any guessing. A directory this call created is removed again when the run
fails before writing anything into it.
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


def check_directory(path: Path, flag: str = "--out") -> bool:
    """Create `path` if missing and prove it writable; returns whether it was created."""
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file, not a directory; choose a directory")
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

    def __init__(self, path: Path, flag: str = "--out", lock: bool = True):
        self.path, self.flag, self.lock = Path(path), flag, lock
        self._file = None
        self._created = False

    def __enter__(self) -> RunDirectory:
        self._created = check_directory(self.path, self.flag)
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
