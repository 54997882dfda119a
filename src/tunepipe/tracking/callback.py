"""The TrainerCallback that streams each logging step into the MLflow run.

transformers ships an `MLflowCallback`, but it drives the fluent API (one process-global
active run), logs the TrainingArguments rather than our config, and has no tokens/s; so
this small callback logs what tunepipe promises: loss, learning rate, grad norm and real
(non-padding) tokens per second at each logging step, plus eval and end-of-training values.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class TrackingCallback(TrainerCallback):
    """Logs every numeric value of each `on_log` call at `state.global_step`, plus tokens/s.

    tokens/s counts the trainer's own `state.num_input_tokens_seen` (non-padding tokens, summed
    over every process) over the time spent in optimizer steps since the previous training
    log, data loading included and evaluation, checkpoint saving and logging excluded, so a
    save or an eval never shows up as a throughput dip.
    """

    def __init__(self, tracker):
        self.tracker = tracker
        self._clock = None          # when training last resumed (after a step, log, eval or save)
        self._busy = 0.0            # seconds of training since the last training log
        self._tokens_at_log = 0     # num_input_tokens_seen at the last training log

    def on_train_begin(self, args, state, control, **kwargs):
        if args.include_num_input_tokens_seen == "no":
            # The trainer counts tokens only when asked; without it there is no tokens/s.
            args.include_num_input_tokens_seen = "non_padding"
        self._tokens_at_log = state.num_input_tokens_seen
        self._busy = 0.0
        self._clock = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._add_busy_time()

    def on_evaluate(self, args, state, control, **kwargs):
        self._clock = time.perf_counter()  # evaluation time is not training time

    def on_save(self, args, state, control, **kwargs):
        self._clock = time.perf_counter()  # nor is writing a checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        # the trainer's own num_input_tokens_seen is logged once, as tokens_seen, on training logs
        metrics = {key: value for key, value in logs.items() if key not in ("step", "num_input_tokens_seen")}
        if "loss" in logs:  # a training log (eval and end-of-training logs have other keys)
            metrics.update(self._throughput(state.num_input_tokens_seen))
        self.tracker.log_metrics(metrics, step=state.global_step)
        self._clock = time.perf_counter()

    def _add_busy_time(self) -> None:
        if self._clock is not None:
            now = time.perf_counter()
            self._busy += now - self._clock
            self._clock = now

    def _throughput(self, tokens_seen: int) -> dict[str, float]:
        tokens = tokens_seen - self._tokens_at_log
        busy, self._busy, self._tokens_at_log = self._busy, 0.0, tokens_seen
        if tokens <= 0 or busy <= 0:
            return {}
        return {"tokens_per_second": tokens / busy, "tokens_seen": float(tokens_seen)}
