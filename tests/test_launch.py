"""Re-launching the train step in several processes: when, how, and with which config.

The 2-process DDP training itself is tests/e2e/test_ddp.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import pytest

from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.train.parallel.launch import (
    LAUNCHED_ENV,
    check_accelerate_config,
    child_env,
    dump_config,
    launcher_command,
    should_relaunch,
)

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


@pytest.fixture
def plain_env(monkeypatch):
    for name in (LAUNCHED_ENV, "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_relaunch_only_for_several_processes_and_only_once(plain_env, monkeypatch):
    assert not should_relaunch(load_config(None, []))
    two = load_config(None, ["train.num_processes=2"])
    assert should_relaunch(two)
    assert should_relaunch(load_config(None, ["train.accelerate_config=configs/accelerate/ddp.yaml"]))
    monkeypatch.setenv(LAUNCHED_ENV, "1")  # inside our own launch
    assert not should_relaunch(two)
    monkeypatch.delenv(LAUNCHED_ENV)
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside a launch the user started by hand
    assert not should_relaunch(two)


def test_dumped_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["train.num_processes=2", "train.learning_rate=3e-4", "model.quantization_bit=4",
                             "data.dataset=identity,alpaca_en_demo", "eval.identity_keywords=[Nova, Orbit]",
                             "export.export_size=200MB", "train.resume_from_checkpoint=false"])
    assert load_config(dump_config(cfg, tmp_path / "c.yaml"), []) == cfg


def test_cpu_launch_uses_torchrun_with_gloo(plain_env, tmp_path):
    cfg = load_config(None, ["train.num_processes=2"])
    command = launcher_command(cfg, tmp_path / "c.yaml", tmp_path)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[-5:] == ["-m", "tunepipe.train.parallel.worker", str(tmp_path / "c.yaml"), "--root", str(tmp_path.resolve())]
    with mock.patch("tunepipe.train.parallel.launch._has_cuda", return_value=False):
        env = child_env()
    assert env[LAUNCHED_ENV] == "1" and env["ACCELERATE_USE_CPU"] == "true"


def test_accelerate_config_launch(plain_env, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(None, ["train.num_processes=4", "train.accelerate_config=configs/accelerate/fsdp.yaml"])
    with mock.patch("tunepipe.train.parallel.launch._has_cuda", return_value=True):
        command = launcher_command(cfg, tmp_path / "c.yaml", tmp_path)
    assert command[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "configs/accelerate/fsdp.yaml"]
    assert command[command.index("--num_processes") + 1] == "4"


def test_multi_node_torchrun_command(plain_env, tmp_path):
    cfg = load_config(None, ["train.num_processes=16", "train.num_machines=2", "train.machine_rank=1",
                             "train.main_process_ip=10.0.0.1", "train.main_process_port=29501"])
    assert should_relaunch(cfg)
    command = launcher_command(cfg, tmp_path / "c.yaml", tmp_path)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" not in command
    options = dict(zip(command[3:13:2], command[4:13:2]))
    assert options == {"--nnodes": "2", "--node_rank": "1", "--nproc_per_node": "8",
                       "--master_addr": "10.0.0.1", "--master_port": "29501"}
    # one process on each of two machines still relaunches
    assert should_relaunch(load_config(None, ["train.num_processes=2", "train.num_machines=2",
                                              "train.main_process_ip=127.0.0.1"]))


def test_multi_node_accelerate_command(plain_env, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(None, ["train.num_processes=4", "train.num_machines=2", "train.machine_rank=0",
                             "train.main_process_ip=10.0.0.1", "train.accelerate_config=configs/accelerate/fsdp.yaml"])
    command = launcher_command(cfg, tmp_path / "c.yaml", tmp_path)
    tail = command[command.index("--num_processes"):command.index("-m", 3)]
    assert tail == ["--num_processes", "4", "--num_machines", "2", "--machine_rank", "0",
                    "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"]


@pytest.mark.parametrize("overrides, key", [
    (["train.num_machines=2", "train.num_processes=3", "train.main_process_ip=h"], "train.num_processes"),
    (["train.num_machines=2", "train.num_processes=2"], "train.main_process_ip"),
    (["train.num_machines=2", "train.num_processes=2", "train.main_process_ip=h", "train.machine_rank=2"],
     "train.machine_rank"),
])
def test_multi_node_settings_are_checked(overrides, key):
    with pytest.raises(TunepipeError, match=key):
        load_config(None, overrides)


def test_fsdp_runs_on_cpu_and_other_gpu_configs_are_refused(monkeypatch):
    monkeypatch.chdir(REPO)
    with mock.patch("tunepipe.train.parallel.launch._has_cuda", return_value=False):
        assert check_accelerate_config("configs/accelerate/fsdp.yaml").name == "fsdp.yaml"  # FSDP2 over gloo


def test_deepspeed_on_cpu_uses_its_cpu_accelerator_not_accelerate_cpu_mode():
    with mock.patch("tunepipe.train.parallel.launch._has_cuda", return_value=False), \
            mock.patch.dict(os.environ, {}, clear=False):
        os.environ.pop("DS_ACCELERATOR", None)
        env = child_env(deepspeed=True)
    assert env["DS_ACCELERATOR"] == "cpu" and "ACCELERATE_USE_CPU" not in env


def test_gpu_accelerate_config_on_a_cpu_machine_is_a_clear_error(monkeypatch):
    monkeypatch.chdir(REPO)
    with mock.patch("tunepipe.train.parallel.launch._has_cuda", return_value=False), \
            pytest.raises(TunepipeError, match="needs GPUs and this machine has none"):
        check_accelerate_config("configs/accelerate/ddp.yaml")
    with pytest.raises(TunepipeError, match="train.accelerate_config='nope.yaml': file not found"):
        check_accelerate_config("nope.yaml")


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_build_their_plugins(path):
    """Each config passes `accelerate launch`'s own validation and yields a working plugin."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(
        ["--config_file", str(path), "--num_processes", "2", "-m", "tunepipe.train.parallel.worker", "params.yaml"])
    args, defaults, _ = _validate_launch_command(parsed)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # train.bf16 / fp16 decide precision
    with mock.patch.dict(os.environ, env):
        if path.name == "fsdp.yaml":
            assert FullyShardedDataParallelPlugin().fsdp_version == 2
        elif path.name.startswith("deepspeed_zero"):
            assert DeepSpeedPlugin().zero_stage == int(path.stem[-1])
        else:
            assert path.name == "ddp.yaml" and args.multi_gpu


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_launcher_stops_when_its_parent_is_killed():
    """`kill -9` of the stage process must not leave training processes running as orphans."""
    import signal
    import subprocess
    import time

    import psutil

    parent_code = (
        "import subprocess, sys, time\n"
        "from tunepipe.train.parallel.launch import _die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " preexec_fn=_die_with_parent())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    launcher = psutil.Process(int(parent.stdout.readline()))
    assert launcher.is_running() and launcher.status() != psutil.STATUS_ZOMBIE
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if launcher.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        launcher.kill()
        pytest.fail("the launcher outlived its killed parent")


def fsdp_plugin_of(config_file: Path):
    """The FSDP plugin a rank builds from `accelerate launch --config_file config_file`'s environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(
        ["--config_file", str(config_file), "--num_processes", "2", "-m", "tunepipe.train.parallel.worker", "params.yaml"])
    args, _, _ = _validate_launch_command(parsed)
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        return FullyShardedDataParallelPlugin()


def test_llamafactory_fsdp_keys_launch_accelerate_fsdp2_with_their_options(plain_env, tmp_path):
    """LLaMA-Factory's `fsdp: [full_shard, auto_wrap]` + `fsdp_transformer_layer_cls_to_wrap` (its FP8
    FSDP example) become an accelerate FSDP2 launch whose plugin has those settings, as
    configs/accelerate/fsdp.yaml's otherwise (tests/e2e/test_fsdp.py trains through them)."""
    import yaml

    cfg = load_config(None, ["fsdp=[full_shard, auto_wrap]", "fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer",
                             "train.num_processes=2"])
    assert should_relaunch(cfg)
    command = launcher_command(cfg, tmp_path / "c.yaml", tmp_path)
    assert command[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    written = yaml.safe_load(Path(command[4]).read_text())
    shipped = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    assert written["fsdp_config"] == {**shipped, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
    plugin = fsdp_plugin_of(Path(command[4]))
    assert (plugin.fsdp_version, plugin.reshard_after_forward, plugin.transformer_cls_names_to_wrap) == \
        (2, True, ["LlamaDecoderLayer"])
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # FSDP2's "no offload"

    other = load_config(None, ["fsdp=shard_grad_op offload", "train.num_processes=2"])
    plugin = fsdp_plugin_of(Path(launcher_command(other, tmp_path / "d.yaml", tmp_path)[4]))
    assert plugin.reshard_after_forward is False and type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    assert plugin.auto_wrap_policy is None  # no auto_wrap: the whole model is one unit
    with pytest.raises(TunepipeError, match="hybrid_shard: tunepipe runs FSDP2"):
        load_config(None, ["fsdp=[hybrid_shard, auto_wrap]"])
    with pytest.raises(TunepipeError, match="not several"):
        load_config(None, ["fsdp=full_shard", "train.accelerate_config=configs/accelerate/fsdp.yaml"])


def test_a_deepspeed_json_with_one_process_trains_here_without_a_launcher(plain_env):
    from tunepipe.train.parallel.one_rank import trains_deepspeed_here

    one = load_config(None, ["train.deepspeed=ds_z3_config.json"])
    assert trains_deepspeed_here(one) and not should_relaunch(one)
    two = load_config(None, ["train.deepspeed=ds_z3_config.json", "train.num_processes=2"])
    assert should_relaunch(two) and not trains_deepspeed_here(two)
    assert not trains_deepspeed_here(load_config(None, []))


def test_the_one_rank_group_leaves_the_process_as_it_found_it(plain_env):
    """Inside: a one-rank gloo group forms from the launcher's variables (port 0: the system's pick);
    after: the environment, torch.distributed, accelerate's shared state and transformers' ZeRO-3
    flag are as before, so a later run in the same process does not train under DeepSpeed."""
    import torch
    import torch.distributed as dist
    from accelerate.state import PartialState
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from tunepipe.train.parallel.one_rank import one_rank_group

    before = dict(os.environ)
    with one_rank_group():
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
        dist.init_process_group("gloo")  # what DeepSpeed's init_distributed does from these variables
        total = torch.ones(2)
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0] and dist.get_world_size() == 1
        PartialState(cpu=True)
        kept = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}})  # as TrainingArguments(deepspeed=...)
        assert is_deepspeed_zero3_enabled()
    assert dict(os.environ) == before
    assert not dist.is_initialized() and PartialState._shared_state == {}
    assert not is_deepspeed_zero3_enabled() and kept.is_zero3()
