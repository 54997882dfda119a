"""Benchmarks whose data comes from the Hub, against the local mirror (tests/fixtures/hub.py serves a
few rows of every mmlu subject as `cais/mmlu`), in one child process pointed at it.

The tutorial user's `llamafactory-cli eval` YAML runs unchanged through `tunepipe eval`: mmlu_test
becomes the harness's mmlu group, 5-shot, scored on the base model (no adapter named), with the
overall score and its four categories. (Unknown tasks and unreachable data: tests/test_benchmarks.py.)
"""

from __future__ import annotations

import json

import pytest
import yaml
from tests.fixtures.hub import MMLU_SPLITS, MODEL_ID, mmlu_subjects
from tests.fixtures.hub_cli import run_tunepipe

LF_EVAL = {"model_name_or_path": MODEL_ID, "trust_remote_code": True, "finetuning_type": "lora",
           "task": "mmlu_test", "template": "fewshot", "lang": "en", "n_shot": 5,
           "save_dir": "saves/qwen3/eval", "batch_size": 4}


@pytest.mark.slow
def test_llamafactory_eval_yaml_runs_mmlu_5_shot_from_the_mirror_on_the_base(
        local_hub, tmp_path):
    (tmp_path / "lf_eval.yaml").write_text(yaml.safe_dump(LF_EVAL))
    proc = run_tunepipe(local_hub.env(tmp_path / "hf"), "eval", "lf_eval.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one log line names the harness task; the harness's progress bar shows the scoring
    assert proc.stderr.count("eval.task mmlu_test (LLaMA-Factory) runs the lm-evaluation-harness task mmlu, 5-shot") \
        == 1
    assert "Running loglikelihood requests: 100%" in proc.stderr
    assert "benchmarking the base model alone" in proc.stderr
    assert "mmlu_stem acc" in proc.stdout  # the table

    report = json.loads((tmp_path / "saves" / "run" / "metrics" / "benchmarks.json").read_text())
    assert json.loads((tmp_path / "saves" / "qwen3" / "eval" / "results.json").read_text()) == report
    groups = {"mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"}
    assert set(report["benchmarks"]) == groups
    assert report["documents"]["mmlu"] == MMLU_SPLITS["test"] * len(mmlu_subjects())
    for group in groups:
        cell = report["benchmarks"][group]["acc"]
        assert set(cell) == {"base", "base_stderr"} and 0 <= cell["base"] <= 1
