"""Two pipeline executions with different learning rates, compared through MLflow.

Each execution (train -> evaluate -> export, the library functions the DVC stages call) is
one MLflow run holding its params, its per-step curves, its eval metrics and its export
figures; reading both back with `MlflowClient`, as `mlflow ui` would show them side by
side, finds the learning rates and the metrics that differ because of them.
"""

from __future__ import annotations

from tunepipe.config.loader import load_config
from tunepipe.evaluate.run import run_evaluate
from tunepipe.export.merge import run_export
from tunepipe.io_utils import read_json
from tunepipe.layout import Layout
from tunepipe.pipeline import run_train_pipeline

LEARNING_RATES = ("0.001", "0.02")


def execute_pipeline(root, tiny_model_dir, lf_demo_dir, mlflow_uri, learning_rate: str) -> Layout:
    cfg = load_config(None, [
        f"model.model_name_or_path={tiny_model_dir}", "data.dataset=identity", f"data.dataset_dir={lf_demo_dir}",
        "data.max_samples=12", "data.val_size=4", "data.cutoff_len=64",
        "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.max_steps=4",
        "train.logging_steps=1", f"train.learning_rate={learning_rate}", "train.lr_scheduler_type=constant",
        f"train.output_dir={root}", "eval.max_new_tokens=4", "eval.max_predict_samples=2",
        "eval.compare_base=false", f"export.export_dir={root / 'export'}", f"tracking.tracking_uri={mlflow_uri}"])
    layout = Layout.at(root)
    run_train_pipeline(cfg, layout)
    run_evaluate(cfg, layout)
    run_export(cfg, layout)
    return layout


def test_two_learning_rates_side_by_side(tmp_path, tiny_model_dir, lf_demo_dir, mlflow_uri):
    from mlflow import MlflowClient

    layouts = {lr: execute_pipeline(tmp_path / f"lr-{lr}", tiny_model_dir, lf_demo_dir, mlflow_uri, lr)
               for lr in LEARNING_RATES}
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.get_experiment_by_name("tunepipe")
    runs = {run.data.params["train.learning_rate"]: run for run in mlflow.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(LEARNING_RATES)  # one run per execution, evaluate and export joined it

    for lr, run in runs.items():
        layout = layouts[lr]
        assert read_json(layout.adapter / "tunepipe_run.json")["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["data.cutoff_len"] == "64"
        loss = mlflow.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in loss) == [1, 2, 3, 4]
        evaluation = read_json(layout.metrics / "eval.json")
        assert run.data.metrics["eval/tuned/eval_loss"] == evaluation["tuned"]["eval_loss"]
        exported = read_json(layout.metrics / "export.json")
        numeric = {key: value for key, value in exported.items() if isinstance(value, (int, float))}
        assert numeric and all(run.data.metrics[f"export/{key}"] == value for key, value in numeric.items())

    slow, fast = runs["0.001"], runs["0.02"]
    # same data and code, so what differs is the learning rate and what it did
    assert slow.data.tags["data_fingerprint"] == fast.data.tags["data_fingerprint"]
    assert slow.data.metrics["learning_rate"] == 0.001 and fast.data.metrics["learning_rate"] == 0.02
    first_losses = [min(mlflow.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step).value
                    for run in (slow, fast)]
    assert first_losses[0] == first_losses[1]  # same start: the first step is taken before any update
    assert slow.data.metrics["loss"] != fast.data.metrics["loss"]
    assert slow.data.metrics["eval/tuned/eval_loss"] != fast.data.metrics["eval/tuned/eval_loss"]
