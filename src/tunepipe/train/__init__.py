"""Training: one module per objective, chosen by `train.stage` through a dict.

`run_train(cfg, layout)` is what the DVC train stage and `tunepipe train` call. With
`train.num_processes > 1` (or an accelerate config) it re-launches itself through
torchrun / accelerate (`launch.py`); each launched process (`worker.py`) lands here again
and trains its rank in-process.

Entry point: `run_train`. Modules: `sft` (also continued pretraining), `dpo` (dpo / orpo /
simpo), `kto`, `rm`; `model_setup` + `adapters` build the model, `collate` + `varlen_attention`
+ `loss` the padding-free batches, `trainer_setup` + `session` + `outputs` the Trainer run.
"""

from __future__ import annotations

from tunepipe.config import Config
from tunepipe.devices import check_precision
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train import dpo, kto, rm, sft
from tunepipe.train.launch import relaunch_train, should_relaunch

# train.stage -> the objective's train(cfg, layout); sft and continued pretraining share one.
TRAINERS = {
    "sft": sft.train,
    "pt": sft.train,
    "dpo": dpo.train, "kto": kto.train, "rm": rm.train,  # preference objectives (dpo: pref_loss)
}


def run_train(cfg: Config, layout: Layout) -> dict | None:
    """Train `train.stage` on the shards under `layout`; returns the metrics/train.json summary
    (None in the parent of a multi-process launch, whose children wrote it)."""
    check_precision(cfg.train)  # before a model load or a launch spends time
    if should_relaunch(cfg):
        relaunch_train(cfg, layout)
        return None
    trainer = TRAINERS.get(cfg.train.stage)
    if trainer is None:
        raise TunepipeError(f"train.stage={cfg.train.stage!r} is not available",
                            hint=f"stages: {', '.join(sorted(TRAINERS))}")
    return trainer(cfg, layout)
