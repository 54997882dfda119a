"""FSDP (version 2) and DeepSpeed inside a launched process: setup before the model loads,
and one ordinary state dict gathered for saving.

Call `prepare_launched_process()` first thing in a rank (`worker.py` does), then build the
model and the Trainer as usual; after training, `gathered_state_dict(trainer)` must run on
every rank (it is a collective) and gives rank 0 the full, unsharded weights to save.

Why hand-written glue: torch's FSDP2 (`fully_shard`) runs on CPU over gloo, but accelerate
1.15 turns on FSDP only for accelerator backends (its AcceleratorState leaves a CPU run as
MULTI_CPU, i.e. DDP, and drops the FSDP plugin). `enable_fsdp_on_cpu` keeps the plugin on a
CPU run, so the Trainer and accelerate's own FSDP2 code (`fsdp2_prepare_model`, RAM-efficient
loading, full-state-dict gathering) run unchanged on CPU as on GPUs.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_PATCHED = "_tunepipe_fsdp_on_cpu"


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP=true to every rank."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def ram_efficient_loading() -> bool:
    """Only rank 0 reads the weights; the others get them by broadcast when FSDP shards the model."""
    return fsdp_requested() and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true"


def prepare_launched_process() -> None:
    """In a launched rank: keep FSDP on a CPU run, and join the process group before anything
    reads the data or the model. Joining waits for every rank, so the ranks of other machines
    (whose parents skip data preparation) read the shards only once machine 0 has written them;
    and transformers' RAM-efficient loading under FSDP needs the group when the model loads."""
    import torch

    if "WORLD_SIZE" not in os.environ:
        return
    if fsdp_requested() and not torch.cuda.is_available():
        enable_fsdp_on_cpu()
    from accelerate import PartialState

    # the Trainer would create this same state later (gloo on CPU, nccl on GPUs)
    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def enable_fsdp_on_cpu() -> None:
    """Make accelerate's AcceleratorState keep its FSDP plugin on a CPU (gloo) run."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState, _PATCHED, False):
        return
    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # every AcceleratorState() copies PartialState's MULTI_CPU back over the shared state,
        # so the plugin of the first construction is looked up again on each one
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what AcceleratorState does for the GPU types, here for gloo
            self.distributed_type = DistributedType.FSDP
            if fsdp_plugin is not None and self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init
    setattr(AcceleratorState, _PATCHED, True)
    log.info("FSDP on CPU: sharding over gloo")


def is_sharded(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))


def gathered_state_dict(trainer):
    """The full state dict of a sharded model (FSDP / DeepSpeed; collective: call on every rank),
    or None when the model is not sharded and saves itself."""
    if not is_sharded(trainer):
        return None
    source = trainer.model_wrapped if getattr(trainer, "is_deepspeed_enabled", False) else trainer.model
    return trainer.accelerator.get_state_dict(source)
