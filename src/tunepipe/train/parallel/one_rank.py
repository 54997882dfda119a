"""DeepSpeed in this very process, as the one rank of a one-process group.

`deepspeed: ds_z3_config.json` with `train.num_processes` 1 (LLaMA-Factory's examples as they
ship, on one GPU or CPU) needs a process group, because DeepSpeed's engine talks through one
even alone; it does not need a launcher. A launcher child would import torch, transformers and
DeepSpeed again before its first step (about 10 CPU seconds for a tiny model, see
docs/benchmarks.md). Instead, `one_rank_group()` sets the five variables a
launcher sets for its rank 0 (RANK, LOCAL_RANK, WORLD_SIZE 1, MASTER_ADDR / MASTER_PORT), so
the Trainer's accelerate state starts DeepSpeed's distributed backend here as it does in a
launched rank (`accelerate.state.PartialState`: LOCAL_RANK set and ACCELERATE_USE_DEEPSPEED),
and undoes all of it afterwards, so a later command of the same process (a test batch, a
notebook) trains as if DeepSpeed had never run: the environment restored, the process group
destroyed (through DeepSpeed, which drops the groups it cached), accelerate's shared state
reset, and transformers' global ZeRO-3 flag cleared (left set, every later `from_pretrained`
would partition its weights through `zero.Init`).

Why hand-written glue: accelerate and transformers read these variables from the environment
only; neither has an API for "one rank, no launcher".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from tunepipe.config import Config

log = logging.getLogger(__name__)


def trains_deepspeed_here(cfg: Config) -> bool:
    """A DeepSpeed JSON with one process on one machine: no launcher, this process is the rank."""
    train = cfg.train
    return (train.deepspeed is not None and train.num_processes == 1 and train.num_machines == 1
            and train.accelerate_config is None and not train.fsdp_options())


@contextmanager
def one_rank_group() -> Iterator[None]:
    """Inside: this process is rank 0 of 1 (the launcher's variables); after: as before."""
    import torch

    saved = dict(os.environ)
    # MASTER_PORT 0: the store of a one-rank group listens on a port the system picks (no other
    # rank has to find it), so two runs at once never collide on a fixed port
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as child_env gives launched ranks
    log.info("DeepSpeed with one process: training in this process (a one-rank group, no launcher)")
    try:
        yield
    finally:
        _leave()
        os.environ.clear()
        os.environ.update(saved)


def _leave() -> None:
    import sys

    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        # DeepSpeed's own teardown also drops the groups it cached (its data-parallel group...):
        # kept, the next DeepSpeed run of this process would use them on a destroyed group
        deepspeed_comm.destroy_process_group()
    elif dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()
