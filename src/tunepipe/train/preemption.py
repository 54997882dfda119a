"""SIGTERM / SIGINT during training: finish the step, save a checkpoint there, stop.

Spot instances and schedulers send SIGTERM and allow a short grace period; Ctrl-C sends
SIGINT. Either one sets a flag; `StopOnSignal` (a TrainerCallback) sees it at the end of the
optimizer step and asks the Trainer, through its own `control.should_save` /
`should_training_stop`, to save a checkpoint and stop, so the checkpoint is the Trainer's
usual one and the next run resumes from it exactly. A second Ctrl-C (a second or more after
the first) stops at once without saving. With several processes every rank must stop at the
same step (a rank that saved while another trained on would hang the collective): the flag
is reduced across ranks at each step end.

In the parent of a multi-process launch `relay_signals` passes SIGTERM / SIGINT on to the
training processes themselves, not to the launcher: torchrun / accelerate treat a signal as
a failure (a traceback, then SIGKILL for workers still saving after their timeout). The
launcher runs in its own session, so a Ctrl-C in the terminal reaches the workers once,
through us. Launched workers that stopped this way exit 0 (`worker.py`); the parent, which
knows it relayed a signal, reports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

from transformers import TrainerCallback

from tunepipe.errors import Interrupted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# a second Ctrl-C sooner than this after the first is the same keypress reaching us twice
# (terminal and launcher), not a request to stop without saving
ESCALATE_AFTER_S = 1.0


class StopOnSignal(TrainerCallback):
    """Turns SIGTERM / SIGINT into "save a checkpoint at this step and stop"."""

    def __init__(self):
        self.received: int | None = None  # the signal number, once one arrived
        self.stopped_at: int | None = None  # the step the Trainer saved and stopped at
        self._received_at = 0.0

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Handle the signals while training (main thread only; elsewhere Python cannot)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()
            log.warning("%s: saving a checkpoint at the end of this step, then stopping%s",
                        signal.Signals(signum).name,
                        " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else "")
        elif signum == signal.SIGINT and time.monotonic() - self._received_at >= ESCALATE_AFTER_S:
            raise KeyboardInterrupt

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args) and not control.should_training_stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def _any_rank_received(self, args) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else int(self.received)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = int(flag.item())  # another rank got it: stop with it, same step
        return bool(flag.item())

    def raise_if_stopped(self, checkpoint_dir, max_steps: int) -> None:
        """After `Trainer.train` returned: raise `Interrupted` naming the saved checkpoint when
        the signal cut the run short (a signal on the final step lets the run finish)."""
        if self.stopped_at is None or self.stopped_at >= max_steps:
            return
        raise interrupted(self.received, f"saved {checkpoint_dir}/checkpoint-{self.stopped_at} "
                                         f"(step {self.stopped_at} of {max_steps})")


def interrupted(signum: int, what: str) -> Interrupted:
    name = signal.Signals(signum).name
    return Interrupted(f"{name}: {what}; run the same command again to resume from it",
                       exit_code=128 + int(signum))


def relay_signals(command: list[str], **popen) -> tuple[int, int | None]:
    """Run `command` (the launcher) in its own session, passing SIGTERM / SIGINT on to it;
    returns (exit code, the signal received or None)."""
    received: list[int] = []
    child = subprocess.Popen(command, start_new_session=True, **popen)

    def forward(signum, frame):
        received.append(signum)
        for process in training_processes(child.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process, signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS} if in_main else {}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, (received[0] if received else None)


def training_processes(launcher_pid: int) -> list[int]:
    """The launcher's descendants (the ranks), or the launcher itself before it started any."""
    import psutil

    try:
        descendants = [p.pid for p in psutil.Process(launcher_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return descendants or [launcher_pid]
