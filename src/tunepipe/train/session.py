"""One training session, the same for every objective: resume point, tracking run, Trainer, outputs.

For the preference trainers: build the model and datasets, then call
`run_session(cfg, layout, model, tokenizer, has_eval, make_trainer)` where
`make_trainer(args, callbacks)` returns your transformers Trainer (TRL's included) built
with those TrainingArguments and callbacks. The session resumes from the last matching
checkpoint, opens the MLflow run, trains, writes every output and closes the run
(FAILED when training raised; a tracking failure itself never stops training).
SIGTERM / SIGINT save a checkpoint at the current step and stop (`preemption.py`); every
checkpoint gets a manifest of its files (`checkpoints.py`); a run resumed from its final
checkpoint trains nothing and writes the outputs from that checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tunepipe.config import Config
from tunepipe.layout import Layout
from tunepipe.train.checkpoints import (
    CheckpointManifest,
    is_last_step,
    record_finished,
    resume_checkpoint,
    save_failed,
)
from tunepipe.train.outputs import LOSS_CSV, LOSS_PNG, TRAIN_METRICS, train_summary, write_outputs
from tunepipe.train.parallel.ray_launch import report_callbacks
from tunepipe.train.parallel.sharding import gathered_state_dict
from tunepipe.train.preemption import StopOnSignal
from tunepipe.train.trainer_setup import ProgressBar, early_stopping, training_arguments

log = logging.getLogger(__name__)


def run_session(cfg: Config, layout: Layout, model, tokenizer, has_eval: bool,
                make_trainer: Callable[..., object]) -> dict:
    """Train and write the outputs; returns the metrics/train.json summary."""
    from transformers import PrinterCallback

    from tunepipe.tracking.tags import data_fingerprint
    from tunepipe.tracking.tracker import Tracker

    resume = resume_checkpoint(cfg, layout, data_fingerprint(layout.tokenized))
    args = training_arguments(cfg, layout, has_eval)
    tracker = Tracker.start(cfg, layout)
    progress, stopper, manifest = ProgressBar(), StopOnSignal(), CheckpointManifest()
    # the stopper asks for a save in on_step_end, so it goes before the manifest (see CheckpointManifest)
    # Ray's report callback copies the checkpoint the manifest completed, so it goes after it
    trainer = make_trainer(args, [progress, tracker.callback(), stopper, manifest, *report_callbacks(),
                                  *early_stopping(cfg.train)])
    trainer.remove_callback(PrinterCallback)  # the progress bar shows the logs
    try:
        if resume and is_last_step(resume):
            summary = summary_from_checkpoint(trainer, resume)
        else:
            result = train_until_done_or_stopped(trainer, resume, stopper, manifest)
            stopper.raise_if_stopped(layout.checkpoints, trainer.state.max_steps)
            summary = train_summary(result, trainer.state, progress.tokens_at_start)
        state_dict = gathered_state_dict(trainer)  # FSDP / DeepSpeed: every rank takes part
        if trainer.is_world_process_zero():
            trained = write_outputs(cfg, layout, trainer.model, tokenizer, summary,
                                    trainer.state.log_history, tracker, state_dict=state_dict)
            record_finished(cfg, layout, trained)
            log_results(tracker, layout, trained, summary)
        trainer.accelerator.wait_for_everyone()
    except BaseException as exc:
        progress.close()  # the error goes on a line of its own
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        _discard_pissa_snapshot(trainer.model)
    tracker.end("FINISHED")
    return summary


def train_until_done_or_stopped(trainer, resume: str | None, stopper: StopOnSignal, manifest: CheckpointManifest):
    """`Trainer.train` with SIGTERM / SIGINT turned into save-and-stop; a failed checkpoint save
    becomes a TunepipeError (the half-written checkpoint removed)."""
    try:
        with stopper.installed():
            return trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:
        if manifest.saving is not None and manifest.saving.is_dir():
            raise save_failed(manifest.saving, exc) from exc
        raise


def summary_from_checkpoint(trainer, checkpoint: str) -> dict:
    """The run's final checkpoint, loaded instead of trained: its outputs were lost (a run
    killed while writing them, or deleted), the weights and history are all in the checkpoint."""
    from pathlib import Path

    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    from tunepipe.train.checkpoints import STATE

    log.info("%s is the run's final step: nothing to train, writing the outputs from it", checkpoint)
    trainer._load_from_checkpoint(checkpoint)  # the Trainer's own loader (adapter, full, sharded)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / STATE))
    state = trainer.state
    points = [(entry["step"], entry["loss"]) for entry in state.log_history if "loss" in entry]
    # the mean loss over all steps, from the logged per-interval means
    weighted, previous = 0.0, 0
    for step, loss in points:
        weighted, previous = weighted + loss * (step - previous), step
    result = TrainOutput(state.global_step, weighted / previous if previous else 0.0, {"train_runtime": 0.0})
    return train_summary(result, state, state.num_input_tokens_seen)


def log_results(tracker, layout: Layout, trained, summary: dict) -> None:
    """Final metrics and the small artifacts (never weights or checkpoints)."""
    tracker.log_metrics({f"final_{key}": value for key, value in summary.items()}, step=summary["steps"])
    for path in (layout.plots / LOSS_CSV, layout.metrics / TRAIN_METRICS, layout.metrics / "data.json",
                 trained / LOSS_PNG, trained / "adapter_config.json", trained / "tunepipe_run.json"):
        tracker.log_artifact(path)


def _discard_pissa_snapshot(model) -> None:
    from tunepipe.train.model.adapters import discard_pissa_snapshot

    discard_pissa_snapshot(model)
