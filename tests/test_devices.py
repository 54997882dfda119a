"""Checks before any work: fp16 without a GPU refused at once, Liger kernels only on a GPU,
Unsloth keys accepted with a line saying what tunepipe does instead."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunepipe import devices
from tunepipe.config import Config, TrainConfig
from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train.trainer_setup import training_arguments

REPO = Path(__file__).resolve().parents[1]


def no_cuda() -> None:
    if devices.has_cuda():
        pytest.skip("this machine has a CUDA GPU")


def test_fp16_without_cuda_is_a_clear_error_naming_bf16():
    no_cuda()
    with pytest.raises(TunepipeError, match="fp16.*CUDA GPU") as info:
        devices.check_precision(TrainConfig(fp16=True))
    assert "bf16: true" in info.value.hint
    devices.check_precision(TrainConfig(bf16=True))  # bf16 autocast exists on every CPU


def write_train_config(tmp_path: Path, tiny_model_dir: Path, **extra) -> tuple[Path, Path]:
    """A LLaMA-Factory-style train YAML over a two-row dataset; returns (config, output_dir)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    (data / "tiny.json").write_text(json.dumps([{"instruction": "Hi", "input": "", "output": "Hello."}] * 2))
    out = tmp_path / "out"
    keys = {"model_name_or_path": str(tiny_model_dir), "dataset": "tiny", "dataset_dir": str(data),
            "output_dir": str(out), "max_steps": 1, "report_to": "none", **extra}
    config = tmp_path / "train.yaml"
    config.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in keys.items()))
    return config, out


def test_train_with_fp16_on_cpu_is_refused_before_any_data_work(tmp_path, tiny_model_dir):
    """In a fresh process, as a user runs it: exit 2, the bf16 hint, nothing written, and (on a
    CPU-only torch build) torch not even imported, which is what keeps the refusal under a second."""
    no_cuda()
    config, out = write_train_config(tmp_path, tiny_model_dir, fp16=True)
    probe = textwrap.dedent(f"""
        import sys
        from tunepipe.cli import main
        code = main(["train", {str(config)!r}])
        print("exit", code, "torch imported", "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False,
                            cwd=tmp_path)
    assert "exit 2" in result.stdout, result.stderr
    assert "error: train.fp16=true needs a CUDA GPU" in result.stderr and "bf16: true" in result.stderr
    assert not out.exists()  # no validated/ rows, no base model copy, nothing
    if importlib.metadata.version("torch").endswith("+cpu"):
        assert "torch imported False" in result.stdout


def test_liger_kernel_without_gpu_warns_once_and_training_goes_on(tmp_path, caplog):
    no_cuda()
    cfg = Config(train=TrainConfig(enable_liger_kernel=True))
    with caplog.at_level(logging.WARNING, logger="tunepipe.devices"):
        args = training_arguments(cfg, Layout.at(tmp_path), has_eval=False)
    assert args.use_liger_kernel is False
    lines = [r.getMessage() for r in caplog.records if "enable_liger_kernel" in r.getMessage()]
    assert len(lines) == 1 and "CUDA GPU only" in lines[0]


def test_liger_kernel_on_a_gpu_goes_to_transformers(tmp_path, monkeypatch):
    """With a GPU (simulated) and the package, transformers' use_liger_kernel is set, its fused
    cross-entropy off (tunepipe's loss already projects only the trained positions)."""
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: object())
    cfg = Config(train=TrainConfig(enable_liger_kernel=True))
    args = training_arguments(cfg, Layout.at(tmp_path), has_eval=False)
    assert args.use_liger_kernel is True
    assert args.liger_kernel_config == {"fused_linear_cross_entropy": False, "cross_entropy": False}
    assert training_arguments(Config(), Layout.at(tmp_path), has_eval=False).use_liger_kernel is False
    assert devices.liger_kernel(TrainConfig(enable_liger_kernel=True, stage="rm")) is False


def test_liger_kernel_on_a_gpu_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunepipeError, match="liger-kernel") as info:
        devices.liger_kernel(TrainConfig(enable_liger_kernel=True))
    assert "tunepipe[liger]" in info.value.hint


def test_liger_kernel_is_a_train_param_of_the_dvc_stage():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "train.enable_liger_kernel" in stages["train"]["params"]
    assert "enable_liger_kernel" in yaml.safe_load((REPO / "params.yaml").read_text())["train"]


@pytest.mark.parametrize("key", ["use_unsloth", "use_unsloth_gc"])
def test_unsloth_is_accepted_with_one_line_on_what_tunepipe_does_instead(tmp_path, caplog, key):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"{key}: true\n")
    with caplog.at_level(logging.WARNING, logger="tunepipe.config.loader"):
        load_config(config)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"{key}: True: tunepipe has no Unsloth integration")
    caplog.clear()
    config.write_text(f"{key}: false\n")
    load_config(config)
    assert not caplog.records  # LLaMA-Factory's default: nothing to say


def test_the_dvc_train_stage_refuses_fp16_before_loading_anything(tmp_path):
    """`dvc repro train` calls run_train directly: the same refusal comes before the base model
    or the shards are read (there are none here) and before a multi-process launch."""
    no_cuda()
    from tunepipe.train import run_train

    with pytest.raises(TunepipeError, match="fp16=true needs a CUDA GPU"):
        run_train(Config(train=TrainConfig(fp16=True, num_processes=2)), Layout.at(tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()
