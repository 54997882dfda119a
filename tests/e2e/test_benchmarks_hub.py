"""Benchmarks whose data comes from the Hub, against the local mirror (tests/fixtures/hub.py serves a
few rows of every mmlu subject as `cais/mmlu`), in one child process pointed at it.

The tutorial user's `llamafactory-cli eval` YAML runs unchanged through `tunepipe eval`: mmlu_test
becomes the harness's mmlu group, 5-shot, scored on the base model (no adapter named), with the
overall score and its four categories; an unknown task name and a task whose data the mirror does
not hold fail with an error naming them before any model is downloaded.
"""

from __future__ import annotations

import json

import pytest
import yaml
from tests.fixtures.hub import MMLU_SPLITS, MODEL_ID, mmlu_subjects
from tests.fixtures.hub_cli import errors_per_command, run_batch

LF_EVAL = {"model_name_or_path": MODEL_ID, "trust_remote_code": True, "finetuning_type": "lora",
           "task": "mmlu_test", "template": "fewshot", "lang": "en", "n_shot": 5,
           "save_dir": "saves/qwen3/eval", "batch_size": 4}


@pytest.mark.slow
def test_llamafactory_eval_yaml_runs_mmlu_from_the_mirror_and_bad_tasks_fail_before_any_model(
        local_hub, tmp_path):
    (tmp_path / "lf_eval.yaml").write_text(yaml.safe_dump(LF_EVAL))
    overrides = [["eval", "lf_eval.yaml", "train.output_dir=bad1", "task=null", "tasks=[mmlu_tset]"],
                 ["eval", "lf_eval.yaml", "train.output_dir=bad2", "task=null", "tasks=[arc_easy]",
                  "compare_base=true"]]
    proc = run_batch(local_hub.env(tmp_path / "hf"),
                     [*([c[0], c[1], *c[2:]] for c in overrides), ["eval", "lf_eval.yaml"]],
                     cwd=tmp_path, keep_going=True)
    outcomes = errors_per_command(proc)
    assert [code for code, _ in outcomes] == [1, 1, 0], proc.stderr[-3000:]
    (unknown,), (unreachable,), _ = (errors for _, errors in outcomes)
    assert "'mmlu_tset' is not an lm-evaluation-harness task" in unknown and "did you mean mmlu" in unknown
    assert "arc_easy: its data could not be loaded" in unreachable
    # neither failure got as far as a model: only the successful run downloaded one
    assert "eval.task mmlu_test (LLaMA-Factory) runs the lm-evaluation-harness task mmlu, 5-shot" in proc.stderr
    assert "no trained model" in proc.stderr and "benchmarking the base model alone" in proc.stderr

    report = json.loads((tmp_path / "saves" / "run" / "metrics" / "benchmarks.json").read_text())
    assert json.loads((tmp_path / "saves" / "qwen3" / "eval" / "results.json").read_text()) == report
    groups = {"mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"}
    assert set(report["benchmarks"]) == groups
    assert report["documents"]["mmlu"] == MMLU_SPLITS["test"] * len(mmlu_subjects())
    for group in groups:
        cell = report["benchmarks"][group]["acc"]
        assert set(cell) == {"base", "base_stderr"} and 0 <= cell["base"] <= 1
    assert not (tmp_path / "bad1" / "metrics").exists() and not (tmp_path / "bad2" / "metrics").exists()
