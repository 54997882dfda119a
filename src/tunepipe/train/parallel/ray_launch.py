"""The train step under Ray Train (LLaMA-Factory's `ray_num_workers`, `resources_per_worker`,
`placement_strategy`, `ray_storage_path`, `ray_run_name`, `ray_init_kwargs`).

With `train.ray_num_workers > 1`, `tunepipe.train.run_train` hands the train step to Ray
Train's `TorchTrainer`, as LLaMA-Factory's `USE_RAY=1` does (tunepipe needs no environment
variable: the key alone decides):

- `ray.init(**ray_init_kwargs)` starts a local Ray cluster, or joins one started with
  `ray start` on the machines (`{address: auto}` or the head's `host:port`, see the README);
- Ray places `ray_num_workers` workers, each holding `resources_per_worker`, by
  `placement_strategy` (Ray Train's ScalingConfig), and joins them in a torch process group
  (gloo on CPU, nccl on GPUs);
- each worker runs `run_train` again as one rank, exactly as a torchrun rank does:
  transformers' Trainer sees the process group and runs DDP; rank 0 writes the outputs
  (adapter, metrics, plots, MLflow run) where a plain run writes them, checkpoints included;
- every checkpoint is also reported to Ray Train (`RayTrainReportCallback`, as in
  LLaMA-Factory), so Ray's own record of the run, `ray_storage_path/ray_run_name/`, holds it.

Data preparation stays in the calling process, as with torchrun. The workers need tunepipe
installed and the layout's folder at the same path on every machine (shared storage).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import yaml

from tunepipe.config import GROUPS, SECRET_KEYS, Config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train.checkpoints import read_record

log = logging.getLogger(__name__)

RAY_WORKER_ENV = "TUNEPIPE_RAY_WORKER"


def wants_ray(cfg: Config) -> bool:
    return cfg.train.ray_num_workers > 1


def run_under_ray(cfg: Config, layout: Layout, rank_entry: Callable[[dict], None]) -> None:
    """Train in `ray_num_workers` Ray Train workers, each running `rank_entry(loop_config)`, and
    wait for them; raise if the run failed. (`tunepipe.train.run_ray_rank` is the entry: passed in,
    since this module cannot import `tunepipe.train` back.)"""
    joined = connect(cfg)
    try:
        trainer = ray_trainer(cfg, layout, rank_entry)
        log.info("training in %d Ray workers", cfg.train.ray_num_workers)
        result = trainer.fit()
    except TunepipeError:
        raise
    except Exception as exc:  # Ray raises its own TrainingFailedError with the workers' traceback
        raise TunepipeError(f"the {cfg.train.ray_num_workers} Ray workers failed: {exc}",
                            hint="rerun with train.ray_num_workers=1 to see the error in one process") from exc
    finally:
        if joined:
            import ray

            ray.shutdown()
    log.info("Ray Train's record of the run: %s", result.path)
    if not (read_record(layout.checkpoints) or {}).get("finished"):
        raise TunepipeError("the Ray workers stopped before the end of training",
                            hint="run the same command again to resume from the last checkpoint")


def connect(cfg: Config) -> bool:
    """`ray.init(**ray_init_kwargs)` unless this process is already connected; True when it connected."""
    try:
        import ray
    except ImportError:
        raise TunepipeError("train.ray_num_workers > 1 needs Ray Train",
                            hint="pip install 'tunepipe[ray]' (or 'ray[train]')") from None
    if ray.is_initialized():
        return False
    settings = cfg.train.ray_init_settings()
    try:
        ray.init(**settings)
    except (ConnectionError, RuntimeError, TypeError, ValueError) as exc:
        raise TunepipeError(f"train.ray_init_kwargs={settings!r}: ray.init failed: {exc}",
                            hint="to join a cluster started with `ray start --head`, give its address "
                                 "(ray_init_kwargs: {address: auto} on one of its machines)") from exc
    return True


def ray_trainer(cfg: Config, layout: Layout, rank_entry: Callable[[dict], None]):
    """The TorchTrainer of the train step: `rank_entry` in each worker, placed by the Ray keys."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = cfg.train
    resources = train.ray_resources()
    # LLaMA-Factory always asks for GPUs; here an unset resources_per_worker follows the cluster
    use_gpu = resources.get("GPU", 0) > 0 if resources else ray.cluster_resources().get("GPU", 0) > 0
    scaling = ScalingConfig(num_workers=train.ray_num_workers, use_gpu=use_gpu,
                            resources_per_worker=resources or ({"GPU": 1} if use_gpu else {"CPU": 1}),
                            placement_strategy=train.placement_strategy)
    run = RunConfig(name=train.ray_run_name, storage_path=str(Path(train.ray_storage_path).resolve()))
    return TorchTrainer(rank_entry, train_loop_config=_loop_config(cfg, layout), scaling_config=scaling,
                        run_config=run)


def _loop_config(cfg: Config, layout: Layout) -> dict:
    """What each worker needs: the resolved config (as `launch.dump_config` writes it, less its
    secrets), the layout root, the caller's working directory (relative paths in the config), and
    the hub token apart (held in memory by Ray, never written to a file)."""
    grouped = {name: {key: value for key, value in dataclasses.asdict(getattr(cfg, name)).items()
                      if f"{name}.{key}" not in SECRET_KEYS} for name in GROUPS}
    return {"config": yaml.safe_dump(grouped, sort_keys=False), "root": str(Path(layout.root).resolve()),
            "cwd": os.getcwd(), "hf_token": cfg.model.hf_hub_token}


def enter_rank(loop_config: dict) -> tuple[Config, Layout]:
    """In a Ray Train worker: the launched-rank setup (Ray made the process group); returns what
    to pass to `run_train`."""
    import tempfile

    from tunepipe.config.loader import load_config
    from tunepipe.train.parallel.launch import child_env
    from tunepipe.train.parallel.sharding import prepare_launched_process

    if Path(loop_config["cwd"]).is_dir():  # Ray Train moves its workers to a folder of its own
        os.chdir(loop_config["cwd"])
    os.environ.update(child_env())  # marks the rank as launched; accelerate uses gloo on CPU
    os.environ[RAY_WORKER_ENV] = "1"
    if loop_config.get("hf_token"):
        os.environ["HF_TOKEN"] = loop_config["hf_token"]
    with tempfile.TemporaryDirectory(prefix="tunepipe-ray-") as scratch:
        config_file = Path(scratch) / "config.yaml"
        config_file.write_text(loop_config["config"], encoding="utf-8")
        cfg = load_config(config_file, [])
    prepare_launched_process()
    return cfg, Layout.at(loop_config["root"])


def report_callbacks() -> list:
    """In a Ray Train worker: Ray's Trainer callback that reports each checkpoint to Ray Train
    (copied under ray_storage_path/ray_run_name), as LLaMA-Factory adds it; elsewhere none."""
    if os.environ.get(RAY_WORKER_ENV) != "1":
        return []
    from ray.train.huggingface.transformers import RayTrainReportCallback

    return [RayTrainReportCallback()]
