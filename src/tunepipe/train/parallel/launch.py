"""Several processes: the train step re-launched through torchrun or `accelerate launch`.

`tunepipe train` and the DVC train stage prepare data in their own single process; only
the training itself fans out. When `train.num_processes > 1` or `train.accelerate_config`
is set, `tunepipe.train.run_train` calls `relaunch_train`, which dumps the resolved config
to a temporary YAML and starts the launcher on `tunepipe.train.parallel.worker`, whose processes run
`run_train` again: they see the launcher's WORLD_SIZE (and our TUNEPIPE_LAUNCHED) and
train in-process, one rank each, through transformers' Trainer (DDP, FSDP or DeepSpeed
as the accelerate config says).

- no accelerate config: `torchrun --standalone --nproc_per_node N`; on a machine without
  CUDA the processes talk over gloo on CPU (ACCELERATE_USE_CPU makes accelerate choose gloo:
  without it each CPU process would train alone).
- an accelerate config: `accelerate launch --config_file F [--num_processes N]`; transformers'
  `fsdp` options (`train.fsdp`) are written as such a config (FSDP2, `fsdp_accelerate_config`).
- several machines (`train.num_machines > 1`): the same command runs on each machine with
  its `train.machine_rank`; torchrun gets `--nnodes/--node_rank/--master_addr/--master_port`
  (static rendezvous on machine 0), accelerate `--num_machines/--machine_rank/--main_process_ip/
  --main_process_port`. `train.num_processes` counts the processes of all machines.

Started by hand, `python -m tunepipe.train.parallel.worker CONFIG [k=v ...] [--root DIR]` is the train step
alone, for launchers run on each machine of a multi-node job (see the README).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import yaml

from tunepipe.config import GROUPS, SECRET_KEYS, Config
from tunepipe.config.checks import name_list
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train.checkpoints import checkpoints_newest_first, read_record
from tunepipe.train.preemption import interrupted, relay_signals

log = logging.getLogger(__name__)

LAUNCHED_ENV = "TUNEPIPE_LAUNCHED"
# Accelerate's distributed types that run on CPU: FSDP2 shards over gloo (see sharding.py),
# DeepSpeed runs its CPU accelerator over gloo; the others (MULTI_GPU, ...) need GPUs.
_CPU_TYPES = {"MULTI_CPU", "NO", "FSDP", "DEEPSPEED"}


def in_launched_process() -> bool:
    """True inside torchrun / accelerate launch processes, ours or a user's."""
    return os.environ.get(LAUNCHED_ENV) == "1" or "WORLD_SIZE" in os.environ


def should_relaunch(cfg: Config) -> bool:
    train = cfg.train
    wants_launcher = (train.num_processes > 1 or train.accelerate_config is not None or train.num_machines > 1
                      or bool(train.fsdp_options()))
    # a DeepSpeed JSON alone (one process) trains in this process: one_rank.py
    return wants_launcher and not in_launched_process()


def relaunch_train(cfg: Config, layout: Layout) -> None:
    """Run the train step in `num_processes` processes and wait for them; raise if any failed."""
    scratch = Path(tempfile.mkdtemp(prefix="tunepipe-launch-"))
    try:
        config_file = dump_config(cfg, scratch / "config.yaml")
        command = launcher_command(cfg, config_file, layout.root)
        log.info("launching %d training processes: %s", cfg.train.num_processes, " ".join(command))
        env = child_env(deepspeed=distributed_type(cfg) == "DEEPSPEED" or cfg.train.deepspeed is not None)
        if cfg.model.hf_hub_token:  # left out of config_file (dump_config); huggingface_hub reads it here
            env["HF_TOKEN"] = cfg.model.hf_hub_token
        returncode, received = relay_signals(command, env=env, preexec_fn=_die_with_parent())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    saved = checkpoints_newest_first(layout.checkpoints)
    if received is not None:  # the ranks saved a checkpoint at one step and stopped
        raise interrupted(received, f"saved {saved[0] if saved else 'no checkpoint'}")
    if returncode != 0:
        raise TunepipeError(f"the {cfg.train.num_processes} training processes failed "
                            f"(launcher exit code {returncode}); their log is above",
                            hint="rerun with train.num_processes=1 to see the error in one process")
    if cfg.train.machine_rank == 0 and not (read_record(layout.checkpoints) or {}).get("finished"):
        # they exit 0 when a signal sent to them alone stopped them (see worker.py)
        raise TunepipeError(f"the training processes stopped before the end (a signal sent to them?): "
                            f"saved {saved[0] if saved else 'no checkpoint'}",
                            hint="run the same command again to resume from it")


def launcher_command(cfg: Config, config_file: Path, root: Path) -> list[str]:
    train = cfg.train
    entry = ["-m", "tunepipe.train.parallel.worker", str(config_file), "--root", str(Path(root).resolve())]
    accelerate_config = train.accelerate_config
    if train.fsdp_options():  # transformers' fsdp keys: the accelerate FSDP2 path, from a written config
        accelerate_config = str(fsdp_accelerate_config(train, config_file.parent / "fsdp_accelerate.yaml"))
    if accelerate_config is not None:
        accelerate_file = check_accelerate_config(accelerate_config)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_file)]
        if train.num_processes > 1 or train.num_machines > 1:
            command += ["--num_processes", str(train.num_processes)]
        if train.num_machines > 1:
            command += ["--num_machines", str(train.num_machines), "--machine_rank", str(train.machine_rank),
                        "--main_process_ip", train.main_process_ip, "--main_process_port",
                        str(train.main_process_port)]
        return command + entry
    if train.deepspeed is not None:
        check_deepspeed_json(train.deepspeed)  # each rank's Trainer then runs DeepSpeed from it
    per_machine = str(train.num_processes // train.num_machines)
    if train.num_machines == 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", per_machine,
                *entry]
    # static rendezvous: every machine names machine 0's address and its own rank
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(train.num_machines),
            "--node_rank", str(train.machine_rank), "--nproc_per_node", per_machine,
            "--master_addr", train.main_process_ip, "--master_port", str(train.main_process_port), *entry]


def fsdp_accelerate_config(train, path: Path) -> Path:
    """transformers' `fsdp` options (LLaMA-Factory passes them to its TrainingArguments) written
    as an accelerate FSDP2 config with configs/accelerate/fsdp.yaml's settings: full_shard frees
    each unit's gathered parameters after its forward, shard_grad_op keeps them until backward
    (FSDP2's reshard_after_forward false), offload keeps parameters on the CPU, auto_wrap makes
    each decoder layer a unit (`fsdp_transformer_layer_cls_to_wrap`, else the model's
    _no_split_modules); without auto_wrap the whole model is one unit."""
    options = set(train.fsdp_options())
    fsdp = {"fsdp_version": 2, "fsdp_reshard_after_forward": "shard_grad_op" not in options,
            "fsdp_offload_params": "offload" in options, "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True, "fsdp_activation_checkpointing": False,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if "auto_wrap" in options else "NO_WRAP"}
    if "auto_wrap" in options and train.fsdp_transformer_layer_cls_to_wrap:
        fsdp["fsdp_transformer_layer_cls_to_wrap"] = ",".join(name_list(train.fsdp_transformer_layer_cls_to_wrap))
    settings = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1,
                "machine_rank": 0, "num_processes": train.num_processes, "mixed_precision": "no",
                "rdzv_backend": "static", "same_network": True, "use_cpu": False, "fsdp_config": fsdp}
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


def distributed_type(cfg: Config) -> str | None:
    """The accelerate config's distributed_type (upper case), None without one."""
    if cfg.train.fsdp_options():
        return "FSDP"
    if cfg.train.accelerate_config is None:
        return None
    return _read_distributed_type(Path(cfg.train.accelerate_config))


def check_accelerate_config(path: str) -> Path:
    """The accelerate config must exist, parse, and ask only for devices this machine has."""
    file = Path(path)
    kind = _read_distributed_type(file)
    if kind not in _CPU_TYPES and not _has_cuda():
        raise TunepipeError(
            f"{path}: distributed_type {kind} needs GPUs and this machine has none",
            hint="on CPU, use configs/accelerate/fsdp.yaml or a DeepSpeed config, or leave "
                 "train.accelerate_config unset and set train.num_processes (DDP over gloo)")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise TunepipeError(f"{path}: a DeepSpeed config needs the deepspeed package",
                            hint="pip install 'tunepipe[deepspeed]' (or deepspeed)")
    return file


def check_deepspeed_json(path: str) -> None:
    """`train.deepspeed` must be a readable JSON object, and deepspeed installed, before any launch."""
    import json

    settings = _read_settings_file("train.deepspeed", path, json.loads, json.JSONDecodeError, "JSON",
                                   hint="LLaMA-Factory's examples/deepspeed/ds_z{0,2,3}_config.json work as they are")
    if not isinstance(settings, dict):
        raise TunepipeError(f"train.deepspeed={path!r}: a DeepSpeed config is a JSON object")
    if importlib.util.find_spec("deepspeed") is None:
        raise TunepipeError(f"train.deepspeed={path!r} needs the deepspeed package",
                            hint="pip install 'tunepipe[deepspeed]' (or deepspeed)")


def _read_settings_file(key: str, path: str, parse, parse_error: type[Exception], kind: str, hint: str):
    """The parsed contents of the settings file a config key names; a missing or unparsable file
    is a TunepipeError naming the key and the path."""
    file = Path(path)
    if not file.is_file():
        raise TunepipeError(f"{key}={path!r}: file not found", hint=hint)
    try:
        return parse(file.read_text(encoding="utf-8"))
    except parse_error as exc:
        raise TunepipeError(f"{key}={path!r}: not valid {kind}: {exc}") from None


def _read_distributed_type(file: Path) -> str:
    path = str(file)
    settings = _read_settings_file("train.accelerate_config", path, yaml.safe_load, yaml.YAMLError, "YAML",
                                   hint="see configs/accelerate/ for DDP, FSDP and DeepSpeed examples") or {}
    kind = str(settings.get("distributed_type", "")).upper() if isinstance(settings, dict) else ""
    if not kind:
        raise TunepipeError(f"{path}: an accelerate config needs a distributed_type")
    return kind


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def child_env(deepspeed: bool = False) -> dict[str, str]:
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    if _has_cuda():
        return env
    if deepspeed:
        # accelerate drops DeepSpeed under ACCELERATE_USE_CPU; DeepSpeed's own CPU accelerator
        # (gloo without oneCCL) runs it instead
        env.setdefault("DS_ACCELERATOR", "cpu")
    else:
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate then sets up gloo, not one lone process each
    return env


def dump_config(cfg: Config, path: Path) -> Path:
    """The resolved config as a grouped YAML that `load_config` reads back to an equal Config,
    less its secrets (`model.hf_hub_token`): those reach the workers in their environment
    (`child_env`), never a file."""
    grouped = {name: {key: value for key, value in dataclasses.asdict(getattr(cfg, name)).items()
                      if f"{name}.{key}" not in SECRET_KEYS}
               for name in GROUPS}
    path.write_text(yaml.safe_dump(grouped, sort_keys=False), encoding="utf-8")
    return path


def _die_with_parent():
    """A preexec_fn: on Linux, if the stage process is killed (`kill -9` by DVC's user or a resume
    test), the launcher gets SIGTERM and stops its workers instead of training on as orphans.

    libc is loaded here, before the fork, so the child only makes the one prctl call.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


# ---------------------------------------------------------------------------- the processes' entry
