"""Atomic outputs, and one run per output dir.

Every stage writes to a temporary sibling and renames it into place (`atomic_dir`,
`write_text_atomic`): a crash, an error or a full disk therefore never leaves a
half-written output for DVC to cache; out of space is a TunepipeError naming the target.

`hold_run_lock(root)` for as long as a run writes under `root`. The lock is `filelock`'s
(flock on Linux / macOS): the kernel releases it when its process ends, however it ends,
so a lock left by a killed run never blocks the next one. Beside it `.tunepipe.lock.json`
names the holder (pid, host, start time, command) so that a second run is refused at once
with a message saying who is running. The lock is re-entrant within a process (`tunepipe
train` holds it over validate -> tokenize -> train, and the train step takes it again),
which a second flock on the same file would not be.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunepipe.errors import TunepipeError, disk_full_cause


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary dir beside `target`; on success it replaces `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the dir 0700; outputs (models a server reads, shards) get the
    # umask's usual modes like any other dir the user creates.
    tmp.chmod(0o777 & ~current_umask())
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, target)
        raise
    replace_path(tmp, target)


def raise_if_disk_full(exc: BaseException, target: Path) -> None:
    """A write that failed for want of space becomes a TunepipeError naming what was being written."""
    full = disk_full_cause(exc)
    if full is not None:
        raise TunepipeError(f"out of disk space writing {target} ({full.strerror}); nothing was left there",
                            hint="free some space (or raise the file-size limit) and run the same command "
                                 "again") from exc


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def replace_path(src: Path, target: Path) -> None:
    """Move `src` onto `target`, removing what was there (file or dir)."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- one run per output dir

LOCK_FILE = ".tunepipe.lock"
OWNER_FILE = ".tunepipe.lock.json"
_held: dict[Path, int] = {}  # lock path -> nesting depth in this process


@contextlib.contextmanager
def hold_run_lock(root: str | Path, machine_rank: int = 0) -> Iterator[None]:
    """Hold `root`'s run lock; a TunepipeError naming the holder when another process has it.

    Machines other than 0 of a multi-node run write into machine 0's output dir (shared
    storage) under machine 0's lock, so they take none."""
    from filelock import FileLock, Timeout

    root = Path(root).resolve()
    path = root / LOCK_FILE
    if machine_rank > 0:
        yield
        return
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise TunepipeError(f"{root} is in use by another tunepipe run: {holder(root)}",
                            hint="wait for it to finish or stop it, or give this run another output_dir "
                                 "(a run that was killed does not hold the lock)") from None
    _held[path] = 1
    try:
        write_json_atomic(root / OWNER_FILE, owner())
        yield
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            (root / OWNER_FILE).unlink()
        lock.release()


def owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def holder(root: Path) -> str:
    """The running process as its owner file names it."""
    try:
        info = read_json(root / OWNER_FILE)
        return f"pid {info['pid']} on {info['host']}, started {info['started']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still starting (no owner recorded yet)"
