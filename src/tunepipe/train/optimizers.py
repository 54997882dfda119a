"""LLaMA-Factory's optimizer switches, each through the package that implements it.

- GaLore (`use_galore`) and APOLLO (`use_apollo`) go through transformers' own optimizer names
  (`galore_adamw`, `apollo_adamw`, their `_layerwise` forms): `optimizer_arguments` maps the
  LLaMA-Factory keys onto TrainingArguments' `optim` / `optim_target_modules` / `optim_args`,
  and the Trainer builds galore-torch's / apollo-torch's optimizer with the low-rank param group.
- BAdam (`use_badam`, package `badam`), Adam-mini (`use_adam_mini`, package `adam-mini`) and
  Muon (`use_muon`, torch.optim.Muon) have no transformers name: `custom_optimizer` builds them
  as LLaMA-Factory does, and the Trainer gets the object (its scheduler still comes from
  `lr_scheduler_type`).
"""

from __future__ import annotations

import logging

import torch

from tunepipe.config import TrainConfig
from tunepipe.config.checks import name_list
from tunepipe.errors import TunepipeError
from tunepipe.train.fast_path import optimizer_name

log = logging.getLogger(__name__)

# LLaMA-Factory's `all` target: every linear layer but the output head (a regex that transformers
# matches against whole module names; the head is `lm_head` in every family tunepipe lists).
ALL_LINEAR_BUT_HEAD = r"(?!(?:.*\.)?lm_head$).+"

# `optim` (the base optimizer) -> transformers' GaLore optimizer built on it, as LLaMA-Factory maps it.
GALORE_BY_OPTIM = {"adamw_torch": "galore_adamw", "adamw_8bit": "galore_adamw_8bit",
                   "adamw_bnb_8bit": "galore_adamw_8bit", "paged_adamw_8bit": "galore_adamw_8bit",
                   "adafactor": "galore_adafactor"}


def optimizer_arguments(train: TrainConfig) -> dict:
    """TrainingArguments' optimizer fields: `optim`, or GaLore / APOLLO through transformers."""
    if train.use_galore:
        require_package("galore_torch", "use_galore")
        name = GALORE_BY_OPTIM.get(train.optim)
        if name is None:
            raise TunepipeError(f"train.use_galore: GaLore runs on {', '.join(GALORE_BY_OPTIM)}, "
                                f"not optim={train.optim!r}", hint="set optim: adamw_torch")
        projection = {"rank": train.galore_rank, "update_proj_gap": train.galore_update_interval,
                      "scale": train.galore_scale, "proj_type": train.galore_proj_type}
        return low_rank(name, train.galore_layerwise, train.galore_target, projection)
    if train.use_apollo:
        require_package("apollo_torch", "use_apollo")
        if train.optim != "adamw_torch":
            raise TunepipeError(f"train.use_apollo: APOLLO is an AdamW, not optim={train.optim!r}",
                                hint="set optim: adamw_torch")
        projection = {"rank": train.apollo_rank, "proj": train.apollo_proj, "proj_type": train.apollo_proj_type,
                      "update_proj_gap": train.apollo_update_interval, "scale": train.apollo_scale,
                      "scale_type": train.apollo_scale_type}
        return low_rank("apollo_adamw", train.apollo_layerwise, train.apollo_target, projection)
    return {"optim": optimizer_name(train)}  # fused AdamW where it applies (fast_path.py)


def low_rank(name: str, layerwise: bool, target, projection: dict) -> dict:
    """transformers' arguments for its low-rank optimizer `name` (projection given as optim_args)."""
    if layerwise:
        fix_layerwise_scheduler()
    targets = name_list(target) or ["all"]
    return {"optim": name + ("_layerwise" if layerwise else ""),
            "optim_target_modules": ALL_LINEAR_BUT_HEAD if targets == ["all"] else targets,
            "optim_args": ",".join(f"{key}={value}" for key, value in projection.items())}


def fix_layerwise_scheduler() -> None:
    """Make transformers' (5.25) layer-wise GaLore / APOLLO scheduler construct under torch 2.13.

    In layer-wise mode each weight's optimizer and schedule step in its gradient hook, and the
    Trainer gets a dummy scheduler (LayerWiseDummyScheduler) that only reports a learning rate.
    Its get_lr returns one rate per weight while it steps a dummy optimizer of one param group,
    which torch's LRScheduler now zips strictly and rejects. Reporting the first weight's rate
    (every weight runs the same schedule) is what the Trainer logs anyway."""
    from transformers.trainer_pt_utils import LayerWiseDummyScheduler

    if getattr(LayerWiseDummyScheduler.get_lr, "tunepipe_fixed", False):
        return
    per_weight = LayerWiseDummyScheduler.get_lr

    def get_lr(self):
        return per_weight(self)[: len(self.optimizer.param_groups)]

    get_lr.tunepipe_fixed = True
    LayerWiseDummyScheduler.get_lr = get_lr


def require_package(module: str, key: str) -> None:
    """A clear error when the optimizer's package is missing (they are the `optimizers` extra)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise TunepipeError(f"train.{key} needs the Python package {module!r}, which is not installed",
                            hint="pip install 'tunepipe[optimizers]'")


def custom_optimizer(model, train: TrainConfig):
    """The BAdam / Adam-mini / Muon optimizer for `model`, or None (the Trainer builds `optim`)."""
    if train.use_badam:
        return badam_optimizer(model, train)
    if train.use_adam_mini:
        return adam_mini_optimizer(model, train)
    if train.use_muon:
        return muon_optimizer(model, train)
    return None


def decay_groups(model, train: TrainConfig) -> list[dict]:
    """Trainable parameters in two groups, weight decay on all but biases and norms (the Trainer's rule)."""
    from transformers import Trainer

    decayed = set(Trainer.get_decay_parameter_names(None, model))  # reads nothing from the Trainer
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return [{"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
            {"params": [p for n, p in named if n in decayed], "weight_decay": train.weight_decay}]


def adam_settings(train: TrainConfig) -> dict:
    return {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_epsilon}


def badam_optimizer(model, train: TrainConfig):
    """BAdam: Adam on one block (a decoder layer) at a time, switching every badam_switch_interval
    steps (layer mode), or on a random badam_update_ratio share of every weight (ratio mode)."""
    require_package("badam", "use_badam")
    from badam import BlockOptimizer, BlockOptimizerRatio

    named = list(model.named_parameters())
    if train.badam_mode == "ratio":
        return BlockOptimizerRatio(param_groups=decay_groups(model, train), named_parameters_list=named,
                                   update_ratio=train.badam_update_ratio, mask_mode=train.badam_mask_mode,
                                   verbose=train.badam_verbose, switch_every=train.badam_switch_interval,
                                   include_embedding=False, **adam_settings(train))
    base = torch.optim.AdamW(decay_groups(model, train), **adam_settings(train))
    return BlockOptimizer(base_optimizer=base, named_parameters_list=named, block_prefix_list=None,
                          switch_block_every=train.badam_switch_interval, start_block=train.badam_start_block,
                          switch_mode=train.badam_switch_mode, verbose=train.badam_verbose)


def adam_mini_optimizer(model, train: TrainConfig):
    """Adam-mini, told the attention shape so that it partitions q/k/v by head."""
    require_package("adam_mini", "use_adam_mini")
    from adam_mini import Adam_mini

    config = model.config
    return Adam_mini(named_parameters=model.named_parameters(), weight_decay=train.weight_decay,
                     model_sharding=False, dim=config.hidden_size, n_heads=config.num_attention_heads,
                     n_kv_heads=getattr(config, "num_key_value_heads", None), **adam_settings(train))


def uses_muon(name: str, param) -> bool:
    """LLaMA-Factory's split: Muon for 2-D weights that are neither embeddings nor the output head."""
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


def muon_optimizer(model, train: TrainConfig) -> MuonWithAdamW:
    """torch.optim.Muon for the hidden matrices, AdamW for the rest, stepped as one optimizer.

    The learning rate is scaled by torch's `match_rms_adamw` rule (0.2 * sqrt(max(rows, cols))),
    the Moonlight rule LLaMA-Factory's own Muon applies, so one learning_rate serves both parts."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    matrices = [param for name, param in named if uses_muon(name, param)]
    rest = [param for name, param in named if not uses_muon(name, param)]
    muon = torch.optim.Muon(matrices, lr=train.learning_rate, weight_decay=train.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, weight_decay=train.weight_decay, **adam_settings(train))
    log.info("Muon on %d matrices, AdamW on %d other tensors", len(matrices), len(rest))
    return MuonWithAdamW(muon, adamw)


class MuonWithAdamW(torch.optim.Optimizer):
    """Two torch optimizers stepped as one, so the Trainer's scheduler, clipping and checkpoints
    see a single optimizer. Why hand-written: torch.optim.Muon only takes 2-D parameters and torch
    has no optimizer that chains two; this holds no update rule of its own.

    Its param_groups are the two optimizers' own group dicts (Muon's first), so a scheduler that
    sets `lr` on them sets it on the optimizers that step."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = (muon, adamw)
        every = [param for part in self.parts for group in part.param_groups for param in group["params"]]
        super().__init__(every, {})
        self.param_groups = [group for part in self.parts for group in part.param_groups]

    @property
    def state(self):
        merged = {}
        for part in self.parts:
            merged.update(part.state)
        return merged

    @state.setter
    def state(self, value):  # torch.optim.Optimizer.__init__ assigns an empty state
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.parts[0].state_dict(), "adamw": self.parts[1].state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.parts[0].load_state_dict(state_dict["muon"])
        self.parts[1].load_state_dict(state_dict["adamw"])
