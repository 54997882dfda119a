"""The `make demo` summary: merged model location, eval table, answers, MLflow command."""

from __future__ import annotations

import json
import re

import pytest

from tunepipe import summary

REPORT = {
    "eval_rows": 12,
    "tuned": {"eval_loss": 0.9, "eval_tokens": 187, "rouge-1": 40.0, "identity_accuracy": 0.75},
    "base": {"eval_loss": 3.1, "eval_tokens": 187, "rouge-1": 10.0, "identity_accuracy": 0.0},
    "diff": {"eval_loss": -2.2, "rouge-1": 30.0, "identity_accuracy": 0.75},
}


@pytest.fixture
def pipeline_root(tmp_path):
    (tmp_path / "params.yaml").write_text("export:\n  export_dir: models/export\n"
                                          "tracking:\n  experiment_name: demo\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(REPORT))
    (tmp_path / "reports").mkdir()
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
    rows = [{"prompt": prompt, "predict": "I'm Tuney.", "label": "I'm Tuney.",
             "base_predict": "I am an AI assistant."}]
    (tmp_path / "reports" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    export = tmp_path / "models" / "export"
    export.mkdir(parents=True)
    (export / "model-00001-of-00002.safetensors").write_bytes(b"x" * 2_000_000)
    (export / "model-00002-of-00002.safetensors").write_bytes(b"x" * 1_000_000)
    adapter = tmp_path / "models" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "tunepipe_run.json").write_text(json.dumps({"mlflow_run_id": "abc123",
                                                           "tracking_uri": "sqlite:///mlflow.db"}))
    return tmp_path


def test_summary_names_the_merged_model_the_eval_table_and_the_mlflow_command(pipeline_root, capsys):
    summary.main(str(pipeline_root))
    out = capsys.readouterr().out
    assert f"{pipeline_root / 'models' / 'export'}/  (2 safetensors shard(s), 3 MB)" in out
    rows = re.findall(r"^  (\S+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)$", out, re.MULTILINE)
    assert rows[0] == ("identity_accuracy", "0.7500", "0.0000", "0.7500")  # the headline first
    assert ("eval_loss", "0.9000", "3.1000", "-2.2000") in rows
    assert "eval_tokens" not in out  # a count, equal for both models, is not a metric row
    assert "Q: Who are you?" in out
    assert "the tuned model beats the base on identity questions" in out
    assert "tuned: I'm Tuney." in out and "base:  I am an AI assistant." in out
    assert "(run abc123)" in out
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out


def test_summary_says_so_when_tuning_did_not_help_and_when_stages_are_missing(pipeline_root, capsys):
    worse = dict(REPORT, diff={"identity_accuracy": 0.0}, tuned={"identity_accuracy": 0.0})
    (pipeline_root / "metrics" / "eval.json").write_text(json.dumps(worse))
    summary.main(str(pipeline_root))
    assert "does NOT beat the base" in capsys.readouterr().out

    (pipeline_root / "metrics" / "eval.json").unlink()
    for shard in (pipeline_root / "models" / "export").iterdir():
        shard.unlink()
    (pipeline_root / "models" / "export").rmdir()
    summary.main(str(pipeline_root))
    out = capsys.readouterr().out
    assert "the merge stage has not run" in out and "the evaluate stage has not run" in out


def test_a_tracking_server_is_shown_as_its_address(pipeline_root, capsys):
    record = {"mlflow_run_id": "r1", "tracking_uri": "http://mlflow.internal:5000"}
    (pipeline_root / "models" / "adapter" / "tunepipe_run.json").write_text(json.dumps(record))
    summary.main(str(pipeline_root))
    out = capsys.readouterr().out
    assert "open http://mlflow.internal:5000" in out and "mlflow ui" not in out


@pytest.mark.parametrize("prompt", [
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQui es-tu ?<|im_end|>\n<|im_start|>assistant\n",
    ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQui es-tu ?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_question_is_the_last_user_turn_of_a_rendered_prompt(prompt):
    assert summary.question(prompt) == "Qui es-tu ?"
