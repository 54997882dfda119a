"""Two processes (DDP over gloo on CPU) train like one process with doubled accumulation.

8 rows, batch 1: 2 processes x accumulation 4 and 1 process x accumulation 8 both make one
optimizer step per epoch over every row, so with the same seed the steps must agree: same
loss per step, same adapter, same token count. Both go through what `tunepipe train` runs
(validate -> tokenize -> train); with `train.num_processes=2` the train step re-launches
itself through torchrun, this test process being the parent that waits (its imports are
already paid, which keeps the test cheap). Only rank 0 creates an MLflow run.
"""

from __future__ import annotations

import logging

import yaml
from tests.fixtures.same_training import assert_same_training, loss_points

from tunepipe.config.loader import load_config
from tunepipe.io_utils import read_json
from tunepipe.layout import Layout
from tunepipe.pipeline import run_train_pipeline


def settings(tiny_model_dir, lf_demo_dir, mlflow_uri) -> dict:
    return {
        "model": {"model_name_or_path": str(tiny_model_dir)},
        "data": {"dataset": "identity", "dataset_dir": str(lf_demo_dir), "max_samples": 8,
                 "cutoff_len": 64, "val_size": 0.0},
        "train": {"per_device_train_batch_size": 1, "num_train_epochs": 3.0, "logging_steps": 1,
                  "learning_rate": 1.0e-3, "lr_scheduler_type": "cosine", "save_steps": 100, "seed": 7},
        "tracking": {"tracking_uri": mlflow_uri},
    }


def test_two_processes_match_one_with_doubled_accumulation(tmp_path, tiny_model_dir, lf_demo_dir, mlflow_uri,
                                                           caplog):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(settings(tiny_model_dir, lf_demo_dir, mlflow_uri)))
    ddp, single = Layout.at(tmp_path / "ddp"), Layout.at(tmp_path / "single")

    with caplog.at_level(logging.INFO, logger="tunepipe.train.parallel.launch"):
        run_train_pipeline(load_config(config, ["train.num_processes=2", "train.gradient_accumulation_steps=4"]),
                           ddp)
    assert any("launching 2 training processes" in r.getMessage() for r in caplog.records)
    run_train_pipeline(load_config(config, ["train.gradient_accumulation_steps=8"]), single)

    assert_same_training(ddp, single, weight_tolerance=1e-6)
    # the token count covers both processes
    assert read_json(ddp.metrics / "train.json")["tokens_seen"] == \
        read_json(single.metrics / "train.json")["tokens_seen"]

    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("tunepipe").experiment_id])
    assert sorted(run.data.params["train.num_processes"] for run in runs) == ["1", "2"]  # rank 1 logged nothing
    (ddp_run,) = [run for run in runs if run.data.params["train.num_processes"] == "2"]
    assert read_json(ddp.adapter / "tunepipe_run.json")["mlflow_run_id"] == ddp_run.info.run_id
    history = sorted((m.step, m.value) for m in mlflow.get_metric_history(ddp_run.info.run_id, "loss"))
    assert history == loss_points(ddp)
