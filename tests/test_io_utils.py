"""Atomic outputs: complete or absent, with the umask's usual modes; out of space is a clear error;
the run lock is re-entrant in its process and names its holder to others."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest

from tunepipe.errors import TunepipeError
from tunepipe.io_utils import atomic_dir, hold_run_lock, write_json_atomic


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_dir_and_json_get_umask_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
        write_json_atomic(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(umask)
    assert mode(tmp_path / "out") == 0o755
    assert mode(tmp_path / "m.json") == 0o644


def test_failed_atomic_dir_leaves_old_output_and_no_temp(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "old.txt").read_text() == "old"


def test_out_of_space_is_a_clear_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "shards"
    full = pytest.raises(TunepipeError, match=f"out of disk space writing {target} .No space left on device.")
    with full, atomic_dir(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(TunepipeError, match="File too large"), atomic_dir(target):
        raise RuntimeError("Error while serializing: I/O error: File too large (os error 27)")
    assert list(tmp_path.iterdir()) == []


def test_the_run_lock_is_reentrant_here_and_refuses_another_process(tmp_path):
    code = ("import sys; from tunepipe.io_utils import hold_run_lock\n"
            "from tunepipe.errors import guarded\n"
            "def run():\n    with hold_run_lock(sys.argv[1]): pass\n"
            "sys.exit(guarded(run))")
    probe = [sys.executable, "-c", code, str(tmp_path)]
    with hold_run_lock(tmp_path), hold_run_lock(tmp_path):  # nested in one process: fine
        holder = json.loads((tmp_path / ".tunepipe.lock.json").read_text())
        refused = subprocess.run(probe, capture_output=True, text=True, check=False)
    assert holder["pid"] == os.getpid()
    assert refused.returncode == 2
    assert f"is in use by another tunepipe run: pid {os.getpid()} on {holder['host']}" in refused.stderr
    assert not (tmp_path / ".tunepipe.lock.json").exists()
    assert subprocess.run(probe, capture_output=True, check=False).returncode == 0  # released
