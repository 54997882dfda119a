"""The train stage's MLflow run, from real training on the tiny model.

One run per training: every config group as params, one loss point per logging step
(the same points as plots/train_loss.csv), the tags, the small artifacts and never a
checkpoint; the run id in tunepipe_run.json. A broken store costs one warning and
leaves the training and its outputs intact; `report_to: none` logs nothing.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace

from tests.fixtures.train_runs import tiny_run
from tunepipe.config import TrackingConfig
from tunepipe.io_utils import read_json
from tunepipe.tracking.tags import data_fingerprint
from tunepipe.tracking.tracker import read_run_record
from tunepipe.train import run_train


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_runs(uri):
    mlflow = client(uri)
    return mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])


def tracked_run(tmp_path, tiny_model_dir, tracking: TrackingConfig, **train):
    cfg, layout = tiny_run(tmp_path / "run", tiny_model_dir, rows=8, max_steps=4, logging_steps=2,
                           save_steps=2, lora_rank=4, plot_loss=True, **train)
    cfg = replace(cfg, tracking=tracking)
    # the tokenize stage's statistics, logged as an artifact when present
    (layout.metrics).mkdir(parents=True, exist_ok=True)
    (layout.metrics / "data.json").write_text(json.dumps({"train": {"rows": 8}}))
    return cfg, layout


def csv_points(path):
    with path.open() as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def test_training_run_holds_params_curves_tags_and_artifacts(tmp_path, tiny_model_dir, mlflow_uri):
    cfg, layout = tracked_run(tmp_path, tiny_model_dir, TrackingConfig(tracking_uri=mlflow_uri))
    summary = run_train(cfg, layout)
    record = read_run_record(layout.adapter)
    (run,) = all_runs(mlflow_uri)
    assert record["mlflow_run_id"] == run.info.run_id and record["tracking_uri"] == mlflow_uri
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["train.lora_rank"] == "4" and params["train.max_steps"] == "4"
    assert params["model.model_name_or_path"] == str(tiny_model_dir)

    mlflow = client(mlflow_uri)
    loss = sorted((m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in loss] == [2, 4]  # one point per logging step
    assert loss == csv_points(layout.plots / "train_loss.csv")  # the same floats, exactly
    for key in ("learning_rate", "grad_norm", "tokens_per_second"):
        assert [m.step for m in mlflow.get_metric_history(run.info.run_id, key)] == [2, 4], key
    tokens = max(m.value for m in mlflow.get_metric_history(run.info.run_id, "tokens_seen"))
    assert tokens == summary["tokens_seen"] == read_json(layout.metrics / "train.json")["tokens_seen"]

    tags = run.data.tags
    assert tags["data_fingerprint"] == data_fingerprint(layout.tokenized)
    assert tags["tunepipe.finetuning_type"] == "lora" and tags["tunepipe.stage"] == "sft"

    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"adapter_config.json", "data.json", "train.json", "train_loss.csv",
            "training_loss.png", "tunepipe_run.json"} <= artifacts
    assert (layout.checkpoints / "checkpoint-4").is_dir()  # checkpoints were written...
    assert not any("checkpoint" in path or path.endswith(".safetensors") for path in artifacts)  # ...not logged


def test_untracked_training_is_the_same_training(tmp_path, tiny_model_dir, mlflow_uri, monkeypatch, caplog):
    """A broken store costs one warning; report_to none logs nothing, even with a store set;
    both train exactly as they would anyway."""
    blocker = tmp_path / "a-file"
    blocker.write_text("the store's folder cannot be created under a file")
    broken_cfg, broken = tracked_run(tmp_path / "broken", tiny_model_dir,
                                     TrackingConfig(tracking_uri=f"sqlite:///{blocker}/mlflow.db"))
    off_cfg, off = tracked_run(tmp_path / "off", tiny_model_dir, TrackingConfig(report_to="none"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    with caplog.at_level(logging.WARNING, logger="tunepipe.tracking.tracker"):
        run_train(broken_cfg, broken)
        warnings = [r.getMessage() for r in caplog.records if r.name == "tunepipe.tracking.tracker"]
        run_train(off_cfg, off)
    assert len(warnings) == 1 and "MLflow tracking disabled" in warnings[0]
    assert [r.getMessage() for r in caplog.records if r.name == "tunepipe.tracking.tracker"] == warnings
    assert all_runs(mlflow_uri) == []
    for layout in (broken, off):
        assert read_run_record(layout.adapter)["mlflow_run_id"] is None
    assert csv_points(broken.plots / "train_loss.csv") == csv_points(off.plots / "train_loss.csv")
    assert (broken.adapter / "adapter_model.safetensors").read_bytes() == \
        (off.adapter / "adapter_model.safetensors").read_bytes()
