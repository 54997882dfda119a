"""The one user-facing exception type.

Anything the user can fix (a bad key, a bad row, a missing file) raises
`TunepipeError`; the CLI and stage scripts print it as `error: ...` and exit 2.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

# a write failed for want of space: the disk, the user's quota, or the file-size limit
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

class TunepipeError(Exception):
    """An error the user can fix; the message names the file, row, key or path."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nhint: {hint}")


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM / SIGINT after saving what it had; the message says where.

    A KeyboardInterrupt, so no `except Exception` on the way up mistakes it for a failure."""

    def __init__(self, message: str, exit_code: int = 130):
        self.exit_code = exit_code
        super().__init__(message)


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind `exc` (itself or in its cause / context chain), or None."""
    import os
    import re

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        # Rust writers (safetensors, tokenizers) raise their own types, naming the errno in the text
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found and int(found.group(1)) in DISK_FULL_ERRNOS:
            return OSError(int(found.group(1)), os.strerror(int(found.group(1))))
        exc = exc.__cause__ or exc.__context__
    return None


def name_deepspeed_accelerator() -> None:
    """accelerate imports DeepSpeed whenever it is installed, also in runs that never use it
    (Trainer set-up, save_pretrained), and DeepSpeed's GPU detection then logs "Setting
    accelerator to CPU ..." in every stage. A CPU-only torch build can only give DeepSpeed its
    CPU accelerator, so every entry point (`guarded`) names that one through DeepSpeed's own
    `DS_ACCELERATOR`, read from torch's version tag (importing torch would cost every command a
    second). A value already set is kept; launched ranks inherit it."""
    import importlib.metadata
    import os

    try:
        cpu_only = importlib.metadata.version("torch").endswith("+cpu")
    except importlib.metadata.PackageNotFoundError:
        return
    if cpu_only:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def defer_unused_deepspeed() -> None:
    """accelerate's `extract_model_from_parallel` (run by every Trainer set-up and every
    `save_pretrained`) imports DeepSpeed whenever it is installed, only to ask whether the model
    is a `DeepSpeedEngine`: about 4 CPU seconds (DeepSpeed imports MLflow) in every command that
    never uses DeepSpeed. A model can only be a DeepSpeedEngine once DeepSpeed has been imported,
    so "is DeepSpeed imported" gives the same answer without the import; a DeepSpeed run imports
    it when it builds its engine and gets the original check. Hooked on accelerate's own import,
    so commands that never load accelerate (validate, env) do not pay for loading it here."""
    import sys

    other = sys.modules.get("accelerate.utils.other")
    if other is not None:
        other.is_deepspeed_available = _deepspeed_imported
    elif not any(isinstance(finder, _AfterAccelerateImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterAccelerateImport())


def _deepspeed_imported() -> bool:
    import sys

    return "deepspeed" in sys.modules


class _AfterAccelerateImport:
    """A meta path finder that finds nothing itself: when `accelerate.utils.other` is being
    imported, it lets the normal finders locate it and swaps the check in once the module ran."""

    def find_spec(self, name, path=None, target=None):
        import importlib.util
        import sys

        if name != "accelerate.utils.other":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def run_then_swap(module) -> None:
            run_module(module)
            module.is_deepspeed_available = _deepspeed_imported

        spec.loader.exec_module = run_then_swap
        return spec


def guarded(fn, debug: bool = False) -> int:
    """Run `fn`; print user errors as `error: ...` (exit 2), tracebacks only with --debug.

    Shared by the CLI and the DVC stage scripts so both follow one convention. SIGTERM
    outside training (which saves a checkpoint first, see `train/preemption.py`) stops the
    command like Ctrl-C, so the temporary files of an unfinished output are removed.
    """
    import sys

    name_deepspeed_accelerator()
    defer_unused_deepspeed()
    try:
        with _sigterm_as_interrupt():
            return fn() or 0
    except TunepipeError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if debug or disk_full_cause(exc) is None:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: out of disk space{where}: {exc.strerror}\nhint: free some space and run the same "
              "command again (finished steps and checkpoints are kept)", file=sys.stderr)
        return TunepipeError.exit_code
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


def _sigterm_as_interrupt():
    """While the command runs, SIGTERM raises `Interrupted` (exit 143) instead of ending the
    process where it stands (main thread only; a handler someone else set is kept)."""
    import contextlib
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return contextlib.nullcontext()

    def stop(signum, frame):
        raise Interrupted("SIGTERM: stopped; finished outputs and checkpoints are kept, "
                          "the unfinished one's temporary files removed", exit_code=128 + signum)

    @contextlib.contextmanager
    def installed():
        signal.signal(signal.SIGTERM, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return installed()


def stage_main(fn) -> None:
    """Entry point of a stage script: `--debug` in argv or TUNEPIPE_DEBUG=1 shows tracebacks."""
    import logging
    import os
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    debug = "--debug" in sys.argv or os.environ.get("TUNEPIPE_DEBUG") == "1"
    sys.exit(guarded(fn, debug=debug))
