"""A train stage killed with SIGKILL resumes from its last checkpoint on the next `dvc repro`
and ends with the adapter an uninterrupted run produces.

The throw-away DVC repo holds only the train stage (copied from the real dvc.yaml), with
its inputs (tokenized shards, the tiny base model's manifest) written by the test, so the
test depends on nothing but the train stage and DVC.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.fixtures.train_runs import tiny_run

from tunepipe.config.loader import load_config
from tunepipe.layout import Layout
from tunepipe.train import run_train

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TRAIN = {"max_steps": 12, "save_steps": 3, "save_total_limit": 2, "per_device_train_batch_size": 2,
         "logging_steps": 1, "learning_rate": 1.0e-2, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1}


def env_for(repo: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(repo / "src"), "DVC_NO_ANALYTICS": "1"}


def train_only_repo(repo: Path, tiny_model_dir: Path) -> Path:
    """git + dvc repo with the real train stage, its code, params and prepared inputs."""
    tiny_run(repo, tiny_model_dir, rows=8, **TRAIN)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "stages").mkdir()
    shutil.copy(REPO / "stages" / "train.py", repo / "stages" / "train.py")
    shutil.copytree(REPO / "configs" / "rewards", repo / "configs" / "rewards")  # a dep of train (grpo's rewards)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stages["train"]}}, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["model_name_or_path"] = str(tiny_model_dir)
    params["train"].update(TRAIN)
    params["tracking"]["report_to"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [str(VENV_BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env_for(repo), capture_output=True)
    return repo


def kill_after_first_checkpoint(repo: Path) -> int:
    """Start `dvc repro`, SIGKILL its whole process group once a checkpoint is complete."""
    proc = subprocess.Popen([str(VENV_BIN / "dvc"), "repro", "train"], cwd=repo, env=env_for(repo),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = repo / "checkpoints" / "checkpoint-3" / "tunepipe_manifest.json"  # a checkpoint's last file
    deadline = time.monotonic() + 300
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def loss_steps(root: Path) -> list[int]:
    with open(root / "plots" / "train_loss.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_sigkilled_train_stage_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir):
    repo = train_only_repo(tmp_path / "repo", tiny_model_dir)
    assert kill_after_first_checkpoint(repo) == -signal.SIGKILL
    assert not (repo / "models" / "adapter").exists()  # outputs appear only when complete
    done = subprocess.run([str(VENV_BIN / "dvc"), "repro", "train"], cwd=repo, env=env_for(repo),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from" in done.stderr

    # the same params, data and base trained in one go, in process
    reference = Layout.at(tmp_path / "reference")
    shutil.copytree(repo / "data", reference.tokenized.parent)
    shutil.copytree(repo / "models" / "base", reference.base_model)
    run_train(load_config(repo / "params.yaml"), reference)

    resumed = load_file(repo / "models" / "adapter" / "adapter_model.safetensors")
    straight = load_file(reference.adapter / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7, msg=name)
    assert loss_steps(repo) == loss_steps(reference.root) == list(range(1, 13))
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 12
    assert metrics["tokens_seen"] == json.loads((reference.metrics / "train.json").read_text())["tokens_seen"]
