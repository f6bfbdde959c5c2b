import os
import signal
import subprocess
import sys

import pytest

from petra.config import ConfigError
from petra.rundir import LOCK, RunDirectory, RunDirectoryInUse


def test_a_second_holder_is_refused_with_the_holders_pid(tmp_path):
    with RunDirectory(tmp_path / "r"):
        with pytest.raises(RunDirectoryInUse, match=rf"in use by another petra process \(pid {os.getpid()} on "):
            with RunDirectory(tmp_path / "r"):
                pass
    with RunDirectory(tmp_path / "r"):  # released on exit
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "r"
    code = (
        f"from petra.rundir import RunDirectory; r = RunDirectory({str(run)!r}).__enter__(); "
        f"print('locked', flush=True); import time; time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirectoryInUse, match=f"pid {proc.pid}"):
        RunDirectory(run).__enter__()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / LOCK).is_file()  # the file stays behind; its lock died with the process
    with RunDirectory(run):
        pass


def test_a_failed_start_removes_only_a_directory_it_created(tmp_path):
    with pytest.raises(ValueError):
        with RunDirectory(tmp_path / "new"):
            raise ValueError("bad data")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(ValueError):
        with RunDirectory(tmp_path / "old"):
            raise ValueError("bad data")
    assert (tmp_path / "old").is_dir()


def test_paths_that_cannot_hold_a_run(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*f is a file, not a directory"):
        RunDirectory(tmp_path / "f").__enter__()
    with pytest.raises(ConfigError, match="--out /proc/petra-run: cannot create the directory"):
        RunDirectory("/proc/petra-run").__enter__()
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("no read-only mount here (needs root)")
    try:
        with pytest.raises(ConfigError, match=r"cannot create the directory \(Read-only file system\)"):
            RunDirectory(ro / "run").__enter__()
    finally:
        subprocess.run(["umount", str(ro)])
