"""One rank of a launched training: `python -m tunepipe.train.parallel.worker CONFIG [k=v ...] [--root DIR]`.

torchrun / `accelerate launch` start this module in every process (see `tunepipe.train.parallel.launch`);
each process loads the config and calls `run_train`, which trains its rank in-process. Started by
hand on each machine of a multi-node job it is the train step alone (see the README).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tunepipe.config.loader import load_config
from tunepipe.errors import Interrupted, guarded
from tunepipe.layout import Layout
from tunepipe.train import run_train
from tunepipe.train.parallel.launch import LAUNCHED_ENV
from tunepipe.train.parallel.sharding import prepare_launched_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunepipe.train.parallel.worker",
                                     description="the train step alone, in this process (one rank)")
    parser.add_argument("config", help="params.yaml, a LLaMA-Factory YAML, or the dump of relaunch_train")
    parser.add_argument("overrides", nargs="*", help="key=value or group.key=value")
    parser.add_argument("--root", default=None, help="layout root (default: train.output_dir)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(levelname)s [rank {rank}] %(name)s: %(message)s")
    debug = os.environ.get("TUNEPIPE_DEBUG") == "1"
    return guarded(lambda: _train(args), debug=debug)


def _train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    prepare_launched_process()
    try:
        run_train(cfg, Layout.at(args.root or cfg.train.output_dir))
    except Interrupted as stopped:
        if os.environ.get(LAUNCHED_ENV) != "1":
            raise
        # launched by tunepipe: a clean exit keeps torchrun / accelerate from reporting a
        # failure; the parent relayed the signal and says where the checkpoint is
        logging.getLogger(__name__).info("%s", stopped)
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter does: left to exit-time destructors,
    a rank sometimes aborted after training ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
