"""The real SmolLM2-135M: a short LoRA SFT runs end to end through `dvc repro train`
(base_model -> validate -> tokenize -> train) in a throw-away copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
COPIED = ["dvc.yaml", "params.yaml", "stages", "src", "data", "schemas", "configs", ".dvcignore", ".gitignore"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd / "src"),
           "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_short_lora_sft_on_smollm2_through_dvc_repro(tmp_path, smollm2_base_dir):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.exists():
            shutil.copy(source, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["model_name_or_path"] = str(smollm2_base_dir)  # converted once per session
    params["data"].update({"cutoff_len": 128, "max_samples": 12})
    params["train"].update({"max_steps": 3, "per_device_train_batch_size": 2, "logging_steps": 1,
                            "save_steps": 2, "learning_rate": 5.0e-4})
    params["tracking"]["report_to"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run([str(VENV_BIN / "dvc"), "init", "-q"], repo)

    done = run([str(VENV_BIN / "dvc"), "repro", "train"], repo)
    assert "Running stage 'train'" in done.stdout

    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 3 and metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0
    assert 0 < metrics["final_loss"] < 10
    plot = json.loads(run([str(VENV_BIN / "dvc"), "plots", "show", "--json"], repo).stdout)
    assert any("train_loss.csv" in key for key in json.dumps(plot).split('"'))
    assert "train" not in run([str(VENV_BIN / "dvc"), "status"], repo).stdout  # up to date

    from peft import PeftModel

    from tunepipe.models.base import load_causal_lm

    tuned = PeftModel.from_pretrained(load_causal_lm(repo / "models" / "base"), str(repo / "models" / "adapter"))
    base = load_causal_lm(repo / "models" / "base")
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 2]])
    with torch.no_grad():
        assert not torch.allclose(tuned(input_ids=ids).logits, base(input_ids=ids).logits)
    assert (repo / "models" / "full" / "NOT_USED.md").is_file()
    assert (repo / "models" / "adapter" / "training_loss.png").is_file()  # plot_loss: true in params.yaml
