"""stage grpo end to end on the tiny model, in process: the project's arithmetic set validated
and tokenized into prompt-only shards (prompt = the chat template up to the generation
prompt, reference = the alpaca `output`), trained with LoRA through the shared session
(MLflow metrics per step: each reward's mean / std, total reward, KL, completion length,
clipped ratio; a completions table; the reward file's sha256), evaluated tuned vs base with
the same rewards; and a run killed with SIGKILL after its first checkpoint, rerun, ends
with the adapter of the uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunepipe.config.loader import load_config
from tunepipe.layout import Layout
from tunepipe.pipeline import run_train_steps
from tunepipe.train import run_train

REPO = Path(__file__).resolve().parents[2]
REWARD_FILE = "configs/rewards/arithmetic.py"
KEYS = {"stage": "grpo", "finetuning_type": "lora", "dataset": "arithmetic", "cutoff_len": 96, "max_samples": 20,
        "val_size": 4, "reward_funcs": [f"{REWARD_FILE}:correct_answer", f"{REWARD_FILE}:answer_format",
                                        "numeric_match", "length_penalty=6"],
        "num_generations": 4, "max_completion_length": 8, "beta": 0.04, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 5.0e-3, "lr_scheduler_type": "constant", "max_steps": 4,
        "save_steps": 2, "logging_steps": 1, "max_new_tokens": 8, "seed": 0}


def write_cfg(root: Path, model_dir: Path, **extra) -> Path:
    cfg = {"model_name_or_path": str(model_dir), "dataset_dir": str(REPO / "data"), "output_dir": str(root / "out"),
           **KEYS, **extra}
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, mlflow_template_db):
    """One uninterrupted run (with MLflow) and a copy of its prepared data for the killed run."""
    root = tmp_path_factory.mktemp("grpo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # reward files resolve from the project root, as under dvc repro / tunepipe train
        cfg = load_config(write_cfg(root, tiny_model_dir, report_to="mlflow", tracking_uri=uri))
        layout = Layout.at(cfg.train.output_dir)
        run_train_steps(cfg, layout)  # validate, tokenize, train
        yield cfg, layout, uri


def test_prompt_shards_hold_the_templated_prompt_and_the_reference(trained, tiny_model_dir):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    _, layout, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    source = {row["output"]: row["instruction"] for row in json.loads((REPO / "data/raw/arithmetic.json").read_text())}
    assert not list(layout.tokenized.rglob("cache-*"))  # training left the tokenize stage's output as it was
    shard = load_from_disk(str(layout.tokenized / "train"))
    assert shard.column_names == ["prompt_ids", "label_text"] and len(shard) == 16
    for row in shard:
        expected = tokenizer.apply_chat_template([{"role": "user", "content": source[row["label_text"]]}],
                                                 add_generation_prompt=True, tokenize=False)
        assert row["prompt_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_mlflow_gets_the_rewards_kl_lengths_clipping_completions_and_the_reward_file_hash(trained):
    from mlflow.tracking import MlflowClient

    _, layout, uri = trained
    run_id = json.loads((layout.adapter / "tunepipe_run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    for name in ("rewards/correct_answer/mean", "rewards/correct_answer/std", "rewards/numeric_match/mean",
                 "rewards/length_penalty/mean", "reward", "kl", "completions/mean_length",
                 "completions/clipped_ratio", "clip_ratio/region_mean"):
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == [1, 2, 3, 4], name
    sha = hashlib.sha256((REPO / REWARD_FILE).read_bytes()).hexdigest()
    assert run.data.tags[f"tunepipe.reward_file.{REWARD_FILE}"] == sha
    table_path = client.download_artifacts(run_id, "completions/step_000004.json", str(layout.root / "dl"))
    table = json.loads(Path(table_path).read_text())
    assert {"prompt", "completion", "reward/correct_answer", "advantage"} <= set(table["columns"])
    assert len(table["data"]) == 4  # the step's group of num_generations completions
    assert json.loads((layout.metrics / "train.json").read_text())["steps"] == 4


def test_evaluate_reports_each_reward_tuned_vs_base(trained):
    from tunepipe.evaluate.run import run_evaluate

    cfg, layout, _ = trained
    report = run_evaluate(cfg, layout)
    for key in ("reward/correct_answer", "reward/numeric_match", "reward", "rouge-l"):
        assert key in report["tuned"] and key in report["base"] and key in report["diff"], key
    assert "eval_loss" not in report["tuned"]  # prompt-only rows have no teacher-forced answer
    assert report["predict_samples"] == 4


def _train_in_child(cfg_path: str) -> None:
    run_train(load_config(cfg_path), Layout.at(load_config(cfg_path).train.output_dir))


def test_a_run_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_adapter(trained, tiny_model_dir,
                                                                                       tmp_path):
    _, reference, _ = trained
    cfg_path = write_cfg(tmp_path, tiny_model_dir, report_to="none")
    layout = Layout.at(tmp_path / "out")
    for part in ("data", "models/base"):  # the same prepared inputs; only training is repeated
        shutil.copytree(reference.root / part, layout.root / part)
    # a forked child (the library is already imported) trains until checkpoint-2 is complete, then dies
    child = multiprocessing.get_context("fork").Process(target=_train_in_child, args=(str(cfg_path),))
    child.start()
    manifest = layout.checkpoints / "checkpoint-2" / "tunepipe_manifest.json"
    deadline = time.monotonic() + 300
    while not manifest.is_file() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL and manifest.is_file()
    assert not (layout.adapter / "adapter_model.safetensors").exists()

    run_train(load_config(cfg_path), layout)  # the rerun resumes from checkpoint-2
    resumed, straight = (load_file(p / "adapter_model.safetensors") for p in (layout.adapter, reference.adapter))
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7, msg=name)
    assert loss_steps(layout) == loss_steps(reference) == [1, 2, 3, 4]


def loss_steps(layout: Layout) -> list[int]:
    with open(layout.plots / "train_loss.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]
