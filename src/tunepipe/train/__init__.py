"""Training: one module per objective, chosen by `train.stage` through a dict.

`run_train(cfg, layout)` is what the DVC train stage and `tunepipe train` call. With
`train.num_processes > 1` (or an accelerate config) it re-launches itself through
torchrun / accelerate (`launch.py`), with `train.ray_num_workers > 1` through Ray Train
(`ray_launch.py`); each launched process (`worker.py`, `run_ray_rank`) lands here
again and trains its rank in-process. A DeepSpeed JSON with one process needs no launcher:
this process trains as the one rank of a one-process group (`one_rank.py`).

Entry point: `run_train`. Objectives: `sft` (also continued pretraining) here, and the
preference objectives in `preference/` (`dpo` for dpo / orpo / simpo, `kto`, `rm`), online RL in
`rl/` (`grpo`); `model_setup` + `adapters` build the model, `collate` + `varlen_attention`
+ `loss` the padding-free batches, `trainer_setup` + `session` + `outputs` the Trainer run.
"""

from __future__ import annotations

import importlib
import logging

from tunepipe.config import Config
from tunepipe.devices import check_precision
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import hold_run_lock
from tunepipe.layout import Layout
from tunepipe.train.parallel.launch import (
    check_deepspeed_json,
    in_launched_process,
    relaunch_train,
    should_relaunch,
)
from tunepipe.train.parallel.one_rank import one_rank_group, trains_deepspeed_here
from tunepipe.train.parallel.ray_launch import enter_rank, run_under_ray, wants_ray

log = logging.getLogger(__name__)

# train.stage -> the module whose train(cfg, layout) runs it; sft and continued pretraining share
# one. Imported when chosen: TRL's trainers (dpo, kto, rm, grpo) import MLflow and more, seconds
# of CPU that an sft run would pay at every start (docs/benchmarks.md, "The test suite").
TRAINERS = {
    "sft": "tunepipe.train.sft",
    "pt": "tunepipe.train.sft",
    "dpo": "tunepipe.train.preference.dpo",  # preference objectives (dpo: pref_loss)
    "kto": "tunepipe.train.preference.kto",
    "rm": "tunepipe.train.preference.rm",
    "grpo": "tunepipe.train.rl.grpo",  # online RL (rl/)
}


def run_train(cfg: Config, layout: Layout) -> dict | None:
    """Train `train.stage` on the shards under `layout`; returns the metrics/train.json summary
    (None in the parent of a multi-process launch, whose children wrote it).

    Holds the output dir's run lock (a launched process runs under its parent's), and
    returns at once when this very run already finished and its outputs are untouched."""
    check_precision(cfg.train)  # before a model load or a launch spends time
    if in_launched_process():
        return _train_here(cfg, layout)
    with hold_run_lock(layout.root, cfg.train.machine_rank):
        done = _finished(cfg, layout)
        if done is not None:
            return done
        if wants_ray(cfg):  # Ray Train starts the ranks (ray_launch.py)
            run_under_ray(cfg, layout, run_ray_rank)
            return None
        if should_relaunch(cfg):
            relaunch_train(cfg, layout)
            return None
        if trains_deepspeed_here(cfg):  # one process: DeepSpeed's engine here, no launcher (one_rank.py)
            check_deepspeed_json(cfg.train.deepspeed)
            with one_rank_group():
                return _train_here(cfg, layout)
        return _train_here(cfg, layout)


def run_ray_rank(loop_config: dict) -> None:
    """One Ray Train worker of `ray_launch.run_under_ray`: one rank of the train step."""
    run_train(*enter_rank(loop_config))


def _finished(cfg: Config, layout: Layout) -> dict | None:
    from tunepipe.tracking.tags import data_fingerprint
    from tunepipe.train.checkpoints import finished_summary

    summary = finished_summary(cfg, layout, data_fingerprint(layout.tokenized))
    if summary is not None:
        log.info(
            "already trained: %s steps with this config and data, outputs unchanged; nothing to do "
            "(overwrite_output_dir: true trains again)", summary.get("steps"))
    return summary


def _train_here(cfg: Config, layout: Layout) -> dict:
    module = TRAINERS.get(cfg.train.stage)
    if module is None:
        raise TunepipeError(f"train.stage={cfg.train.stage!r} is not available",
                            hint=f"stages: {', '.join(sorted(TRAINERS))}")
    return importlib.import_module(module).train(cfg, layout)
