"""MLflow tracking: params, tags, per-step curves, artifacts, joining, and failing quietly.

Unit tests drive the tracker and its TrainerCallback the way transformers' Trainer does
(on_train_begin, on_step_end, on_log with realistic logs). Tests that train for real are
in test_tracking_train.py.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunepipe.config import GROUPS
from tunepipe.config.loader import load_config
from tunepipe.layout import Layout
from tunepipe.tracking.tags import data_fingerprint
from tunepipe.tracking.tracker import (
    DEFAULT_TRACKING_URI,
    RUN_RECORD,
    Tracker,
    configured_tracking_uri,
    read_run_record,
    resolve_tracking_uri,
    run_record,
    write_run_record,
)

REPO = Path(__file__).resolve().parents[1]


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def make_config(mlflow_uri: str, *overrides: str):
    return load_config(None, [f"tracking.tracking_uri={mlflow_uri}", *overrides])


def make_layout(tmp_path: Path) -> Layout:
    layout = Layout.at(tmp_path / "root")
    (layout.tokenized / "train").mkdir(parents=True)
    (layout.tokenized / "train" / "data-00000-of-00001.arrow").write_bytes(b"shard-bytes")
    (layout.tokenized / "meta.json").write_text('{"stage": "sft"}')
    return layout


def fake_args():
    # the TrainingArguments attributes the callback reads
    return SimpleNamespace(include_num_input_tokens_seen="no")


def test_start_logs_every_group_flattened(mlflow_uri, tmp_path):
    cfg = make_config(mlflow_uri, "train.lora_rank=4", "data.dataset=identity,alpaca_en_demo")
    tracker = Tracker.start(cfg, make_layout(tmp_path))
    assert tracker.enabled
    params = client(mlflow_uri).get_run(tracker.run_id).data.params
    expected = {f"{group}.{f.name}" for group, cls in GROUPS.items() for f in fields(cls)}
    assert set(params) == expected - {"model.hf_hub_token"}  # a secret is never a param
    assert params["train.lora_rank"] == "4"
    assert params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert params["data.dataset"] == "identity,alpaca_en_demo"
    assert params["model.quantization_bit"] == "None"


def test_overlong_param_is_truncated_not_rejected(mlflow_uri, tmp_path):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    keywords = "[" + ",".join(f"name{i:05d}" for i in range(1000)) + "]"
    cfg = make_config(mlflow_uri, f"eval.identity_keywords={keywords}")
    tracker = Tracker.start(cfg, make_layout(tmp_path))
    value = client(mlflow_uri).get_run(tracker.run_id).data.params["eval.identity_keywords"]
    assert len(value) == MAX_PARAM_VAL_LENGTH
    assert value.startswith('["name00000", "name00001"') and value.endswith("...[truncated]")


def test_tags_name_commit_dvc_experiment_and_data(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DVC_EXP_NAME", "plumy-tram")
    layout = make_layout(tmp_path)
    tracker = Tracker.start(make_config(mlflow_uri), layout)
    run = client(mlflow_uri).get_run(tracker.run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert run.data.tags["git_commit"] == head
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["dvc_exp_name"] == "plumy-tram"
    assert run.info.run_name == "plumy-tram"
    assert run.data.tags["data_fingerprint"] == data_fingerprint(layout.tokenized)
    assert run.data.tags["tunepipe.finetuning_type"] == "lora"


def test_data_fingerprint_follows_shard_bytes_only(tmp_path):
    layout = make_layout(tmp_path)
    before = data_fingerprint(layout.tokenized)
    (layout.tokenized / "train" / "state.json").write_text('{"_fingerprint": "random"}')
    (layout.tokenized / ".train.tmp-1").mkdir()
    assert data_fingerprint(layout.tokenized) == before
    (layout.tokenized / "train" / "data-00000-of-00001.arrow").write_bytes(b"other-bytes")
    assert data_fingerprint(layout.tokenized) != before
    assert data_fingerprint(tmp_path / "missing") is None


def run_fake_training(callback, tokens_per_step=(30, 50, 40, 60, 20, 10), logging_steps=2):
    """Call the callback in the order transformers' Trainer does, with realistic logs."""
    from transformers import TrainerState

    args, state, control = fake_args(), TrainerState(), None
    callback.on_train_begin(args, state, control)
    for step, tokens in enumerate(tokens_per_step, start=1):
        state.num_input_tokens_seen += tokens
        state.global_step = step
        callback.on_step_end(args, state, control)
        if step % logging_steps == 0:
            callback.on_log(args, state, control, logs={
                "loss": 3.0 / step, "grad_norm": 1.5, "learning_rate": 1e-4 * (1 - step / 10),
                "epoch": step / len(tokens_per_step), "num_input_tokens_seen": state.num_input_tokens_seen})
            callback.on_save(args, state, control)
    callback.on_log(args, state, control, logs={"eval_loss": 0.7, "eval_runtime": 0.1})
    callback.on_log(args, state, control, logs={"train_loss": 1.1, "train_runtime": 3.0, "total_flos": 10.0})
    return args, state


def test_callback_logs_one_point_per_logging_step(mlflow_uri, tmp_path):
    tracker = Tracker.start(make_config(mlflow_uri), make_layout(tmp_path))
    args, _ = run_fake_training(tracker.callback())
    assert args.include_num_input_tokens_seen == "non_padding"  # the trainer now counts tokens
    mlflow = client(mlflow_uri)

    def history(key):
        return [(m.step, m.value) for m in sorted(mlflow.get_metric_history(tracker.run_id, key),
                                                   key=lambda m: m.step)]

    assert history("loss") == [(2, 1.5), (4, 0.75), (6, 0.5)]
    assert [step for step, _ in history("learning_rate")] == [2, 4, 6]
    assert history("grad_norm") == [(2, 1.5), (4, 1.5), (6, 1.5)]
    assert history("tokens_seen") == [(2, 80.0), (4, 180.0), (6, 210.0)]
    assert [step for step, value in history("tokens_per_second") if value > 0] == [2, 4, 6]
    assert history("eval_loss") == [(6, 0.7)]
    assert history("train_loss") == [(6, 1.1)]
    assert history("num_input_tokens_seen") == []  # logged once, as tokens_seen


def test_callback_is_silent_on_other_ranks(mlflow_uri, tmp_path):
    tracker = Tracker.start(make_config(mlflow_uri), make_layout(tmp_path))
    callback = tracker.callback()
    from transformers import TrainerState

    state = TrainerState(is_world_process_zero=False, global_step=1)
    callback.on_train_begin(fake_args(), state, None)
    callback.on_log(fake_args(), state, None, logs={"loss": 1.0})
    assert client(mlflow_uri).get_run(tracker.run_id).data.metrics == {}


def test_artifacts_are_files_only(mlflow_uri, tmp_path):
    tracker = Tracker.start(make_config(mlflow_uri), make_layout(tmp_path))
    stats = tmp_path / "data.json"
    stats.write_text('{"rows": 3}')
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "optimizer.pt").write_bytes(b"x")
    tracker.log_artifact(stats, "metrics")
    tracker.log_artifact(checkpoint)
    tracker.log_artifact(tmp_path / "absent.png")
    assert tracker.enabled
    listed = client(mlflow_uri).list_artifacts(tracker.run_id, "metrics")
    assert [a.path for a in listed] == ["metrics/data.json"]
    assert [a.path for a in client(mlflow_uri).list_artifacts(tracker.run_id)] == ["metrics"]
    # a sqlite store keeps its artifacts beside the .db file, not in the cwd's ./mlruns
    store_dir = Path(mlflow_uri[len("sqlite:///"):]).parent
    assert (store_dir / "mlartifacts" / "tunepipe" / tracker.run_id / "artifacts" / "metrics" / "data.json").is_file()


def test_join_logs_into_the_recorded_run(mlflow_uri, tmp_path):
    cfg = make_config(mlflow_uri)
    tracker = Tracker.start(cfg, make_layout(tmp_path))
    trained = tmp_path / "adapter"
    write_run_record(trained, cfg, tracker)
    record = read_run_record(trained)
    assert record == {"mlflow_run_id": tracker.run_id, "tracking_uri": mlflow_uri, "stage": "sft",
                      "finetuning_type": "lora", "quantization_bit": None,
                      "base_model": cfg.model.model_name_or_path}
    tracker.end("FINISHED")
    # evaluate runs later, possibly with another MLFLOW_TRACKING_URI: the record wins
    joined = Tracker.join(load_config(None, []), trained)
    assert joined.run_id == tracker.run_id
    joined.log_metrics({"eval/loss": 0.5, "eval/identity_accuracy": 1.0})
    joined.set_tags({"export.dir": "models/export"})
    joined.end("FINISHED")
    run = client(mlflow_uri).get_run(tracker.run_id)
    assert run.data.metrics["eval/identity_accuracy"] == 1.0
    assert run.data.tags["export.dir"] == "models/export"
    assert run.info.status == "FINISHED"


def test_join_without_a_recorded_run_is_a_noop(mlflow_uri, tmp_path):
    cfg = make_config(mlflow_uri, "tracking.report_to=none")
    trained = tmp_path / "adapter"
    write_run_record(trained, cfg, Tracker.start(cfg, make_layout(tmp_path)))
    assert read_run_record(trained)["mlflow_run_id"] is None
    assert not Tracker.join(make_config(mlflow_uri), trained).enabled
    assert not Tracker.join(make_config(mlflow_uri), tmp_path / "nothing-here").enabled


def test_report_to_none_logs_nothing(mlflow_uri, tmp_path):
    tracker = Tracker.start(make_config(mlflow_uri, "tracking.report_to=none"), make_layout(tmp_path))
    assert not tracker.enabled and tracker.run_id is None
    run_fake_training(tracker.callback())
    tracker.log_artifact(__file__)
    tracker.end("FINISHED")
    assert client(mlflow_uri).search_runs(
        [e.experiment_id for e in client(mlflow_uri).search_experiments()]) == []


def test_only_rank_zero_creates_a_run(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not Tracker.start(make_config(mlflow_uri), make_layout(tmp_path)).enabled
    assert client(mlflow_uri).get_experiment_by_name("tunepipe") is None


def test_unusable_store_costs_one_warning(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    cfg = load_config(None, [f"tracking.tracking_uri=sqlite:///{blocker}/mlflow.db"])
    with caplog.at_level(logging.WARNING, logger="tunepipe.tracking.tracker"):
        tracker = Tracker.start(cfg, make_layout(tmp_path))
        run_fake_training(tracker.callback())
        tracker.log_artifact(__file__)
        tracker.end("FINISHED")
    assert not tracker.enabled
    warnings = [r.getMessage() for r in caplog.records if r.name == "tunepipe.tracking.tracker"]
    assert len(warnings) == 1 and "MLflow tracking disabled" in warnings[0] and str(blocker) in warnings[0]


def test_store_failing_mid_run_costs_one_warning(mlflow_uri, tmp_path, caplog, monkeypatch):
    cfg = make_config(mlflow_uri)
    tracker = Tracker.start(cfg, make_layout(tmp_path))
    assert tracker.enabled

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tracker._client, "log_batch", broken)
    with caplog.at_level(logging.WARNING, logger="tunepipe.tracking.tracker"):
        run_fake_training(tracker.callback())
        tracker.end("FINISHED")
    warnings = [r.getMessage() for r in caplog.records if r.name == "tunepipe.tracking.tracker"]
    assert len(warnings) == 1 and "disk full" in warnings[0]
    assert not tracker.enabled
    # the run exists in the store, so the record still names it for evaluate to join
    assert run_record(cfg, tracker)["mlflow_run_id"] == tracker.run_id


def test_tracking_uri_precedence_and_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    cfg = load_config(None, [])
    assert configured_tracking_uri(cfg.tracking) == DEFAULT_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert configured_tracking_uri(cfg.tracking) == "http://mlflow.internal:5000"
    cfg = load_config(None, ["tracking.tracking_uri=sqlite:///runs/m.db"])
    assert configured_tracking_uri(cfg.tracking) == "sqlite:///runs/m.db"

    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))  # dvc exp run --temp: the user's repo
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/repo/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"


def test_context_manager_marks_failed_runs(mlflow_uri, tmp_path):
    tracker = Tracker.start(make_config(mlflow_uri), make_layout(tmp_path))
    with pytest.raises(RuntimeError), tracker:
        raise RuntimeError("training crashed")
    assert client(mlflow_uri).get_run(tracker.run_id).info.status == "FAILED"
    assert RUN_RECORD == "tunepipe_run.json"


def test_callback_in_a_real_trainer_counts_real_tokens(mlflow_uri, tmp_path, tiny_model_dir):
    """transformers' own Trainer loop: one point per logging step, tokens = non-padding tokens."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": list(range(10, 14 + 3 * i)), "labels": list(range(10, 14 + 3 * i))} for i in range(12)]
    tracker = Tracker.start(make_config(mlflow_uri), make_layout(tmp_path))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=6,
                             logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                      train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tokenizer),
                      callbacks=[tracker.callback()])
    trainer.train()
    mlflow = client(mlflow_uri)
    losses = sorted(mlflow.get_metric_history(tracker.run_id, "loss"), key=lambda m: m.step)
    logged = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    assert [m.step for m in losses] == [step for step, _ in logged] == [2, 4, 6]
    assert [m.value for m in losses] == pytest.approx([loss for _, loss in logged])
    tokens = mlflow.get_metric_history(tracker.run_id, "tokens_seen")
    # one epoch of 12 rows: every real token once, and no padding
    assert max(m.value for m in tokens) == sum(len(row["input_ids"]) for row in rows)
    assert len(mlflow.get_metric_history(tracker.run_id, "tokens_per_second")) == 3
