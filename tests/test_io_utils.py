"""Atomic outputs: complete or absent, with the umask's usual modes."""

from __future__ import annotations

import os
import stat

import pytest

from tunepipe.io_utils import atomic_dir, write_json_atomic


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
