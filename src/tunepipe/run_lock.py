"""One run per output dir: `hold_run_lock(root)` for as long as a run writes under `root`.

The lock is `filelock`'s (flock on Linux / macOS): the kernel releases it when its process
ends, however it ends, so a lock left by a killed run never blocks the next one. Beside
it `.tunepipe.lock.json` names the holder (pid, host, start time, command) so that a second
run is refused at once with a message saying who is running. The lock is re-entrant
within a process (`tunepipe train` holds it over validate -> tokenize -> train, and the
train step takes it again), which a second flock on the same file would not be.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from tunepipe.errors import TunepipeError
from tunepipe.io_utils import read_json, write_json_atomic

LOCK_FILE = ".tunepipe.lock"
OWNER_FILE = ".tunepipe.lock.json"
_held: dict[Path, int] = {}  # lock path -> nesting depth in this process


@contextlib.contextmanager
def hold_run_lock(root: str | Path) -> Iterator[None]:
    """Hold `root`'s run lock; a TunepipeError naming the holder when another process has it."""
    from filelock import FileLock, Timeout

    root = Path(root).resolve()
    path = root / LOCK_FILE
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
