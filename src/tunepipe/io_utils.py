"""Atomic outputs: every stage writes to a temporary sibling and renames it into place.

A crash or an error therefore never leaves a half-written output for DVC to cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
