"""The evaluate stage on the tiny model: every metric for tuned and base, the diff, the
predictions file, MLflow logging into the train run, preference rewards, user errors."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.adapters import (
    QUESTIONS,
    make_adapter,
    make_reward_adapter,
    pair_row,
    save_split,
    write_sft_eval_split,
)
from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.evaluate.run import run_evaluate
from tunepipe.layout import Layout

METRICS = {"eval_loss", "perplexity", "token_accuracy", "rouge-1", "rouge-2", "rouge-l", "bleu-4",
           "identity_accuracy"}


def config(tiny_model_dir, *overrides):
    return load_config(None, [f"model.model_name_or_path={tiny_model_dir}", "eval.max_new_tokens=5",
                              "train.per_device_eval_batch_size=4", "tracking.report_to=none", *overrides])


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    """One evaluation with MLflow on: an adapter from a recorded train run, six SFT eval rows."""
    from tunepipe.models.base import load_tokenizer
    from tunepipe.tracking.tracker import Tracker, write_run_record

    root = tmp_path_factory.mktemp("eval-run")
    write_sft_eval_split(load_tokenizer(tiny_model_dir), root)
    layout = Layout.at(root)
    make_adapter(tiny_model_dir, layout.adapter, scale=1.0)
    # The suite's shared store (conftest's MLFLOW_TRACKING_URI): creating a fresh sqlite
    # store costs more than the whole evaluation.
    cfg = config(tiny_model_dir, "tracking.report_to=mlflow", "eval.identity_keywords=[Tuney, unc]",
                 "eval.max_predict_samples=5")
    tracker = Tracker.start(cfg, layout)
    assert tracker.enabled
    uri = tracker.tracking_uri
    write_run_record(layout.adapter, cfg, tracker)
    tracker.end()
    report = run_evaluate(cfg, layout)
    return cfg, layout, report, tracker.run_id, uri


def test_every_metric_for_tuned_and_base_and_their_difference(evaluated):
    _, layout, report, _, _ = evaluated
    assert json.loads((layout.metrics / "eval.json").read_text()) == report
    assert METRICS <= set(report["tuned"]) and METRICS <= set(report["base"])
    for key in METRICS:
        assert report["diff"][key] == pytest.approx(report["tuned"][key] - report["base"][key], abs=1e-5)
    assert report["eval_rows"] == len(QUESTIONS) and report["predict_samples"] == 5
    # The adapter changes the model, so the two columns differ.
    assert report["tuned"]["eval_loss"] != pytest.approx(report["base"]["eval_loss"])
    for column in ("tuned", "base"):
        assert report[column]["perplexity"] == pytest.approx(2.718281828 ** report[column]["eval_loss"], rel=1e-4)


def test_predictions_file_holds_prompt_answer_and_reference(evaluated, tiny_model_dir):
    import torch
    from peft import PeftModel

    from tunepipe.models.base import load_causal_lm, load_tokenizer

    _, layout, report, _, _ = evaluated
    rows = [json.loads(line) for line in (layout.reports / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert [row["label"] for row in rows] == [answer for _, answer in QUESTIONS[:5]]
    assert all(row["prompt"].endswith("<|im_start|>assistant\n") for row in rows)
    assert {"prompt", "predict", "label", "base_predict"} <= set(rows[0])
    # The tuned answers are what base + adapter generates greedily for those prompts.
    tokenizer = load_tokenizer(tiny_model_dir)
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(layout.adapter)).eval()
    question = QUESTIONS[0][0]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert rows[0]["predict"] == expected and expected
    # identity_accuracy counts answers containing a keyword ("unc" is what this adapter says).
    hits = sum("unc" in row["predict"].lower() or "tuney" in row["predict"].lower() for row in rows)
    assert report["tuned"]["identity_accuracy"] == pytest.approx(hits / 5)


def test_metrics_are_logged_into_the_train_run(evaluated):
    from mlflow.tracking import MlflowClient

    _, _, report, run_id, uri = evaluated
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged["eval/tuned/rouge-l"] == pytest.approx(report["tuned"]["rouge-l"])
    assert logged["eval/base/eval_loss"] == pytest.approx(report["base"]["eval_loss"])
    assert logged["eval/diff/perplexity"] == pytest.approx(report["diff"]["perplexity"])


def test_preference_eval_reports_reward_margins(tiny_model_dir, tmp_path):
    from tunepipe.models.base import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    rows = [pair_row(tokenizer, q, a, "I do not know.") for q, a in QUESTIONS[:4]]
    save_split(rows, tmp_path / "data" / "tokenized" / "eval")
    layout = Layout.at(tmp_path)
    make_adapter(tiny_model_dir, layout.adapter, seed=3)
    cfg = config(tiny_model_dir, "train.stage=dpo", "train.pref_beta=0.2", "eval.max_predict_samples=2")
    report = run_evaluate(cfg, layout)
    pref = report["preference"]
    assert pref["eval_pairs"] == 4
    assert pref["rewards/margins"] == pytest.approx(pref["rewards/chosen"] - pref["rewards/rejected"], abs=1e-9)
    assert pref["rewards/chosen"] != 0.0  # the adapter moved the log-probs away from the base
    # Generation metrics come from the chosen answers of the pairs.
    assert report["predict_samples"] == 2 and "rouge-1" in report["tuned"]
    predictions = (tmp_path / "reports" / "predictions.jsonl").read_text().splitlines()
    assert json.loads(predictions[0])["label"] == QUESTIONS[0][1]


def test_reward_model_eval_reports_pairwise_accuracy(tiny_model_dir, tmp_path):
    import torch

    from tunepipe.evaluate.scoring import load_reward_model
    from tunepipe.models.base import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    rows = [pair_row(tokenizer, q, a, "I do not know.") for q, a in QUESTIONS]
    save_split(rows, tmp_path / "data" / "tokenized" / "eval")
    layout = Layout.at(tmp_path)
    make_reward_adapter(tiny_model_dir, layout.adapter)
    report = run_evaluate(config(tiny_model_dir, "train.stage=rm"), layout)
    # The same scores one unpadded row at a time.
    model = load_reward_model(layout.adapter, tiny_model_dir, tokenizer.pad_token_id)
    with torch.no_grad():
        def score(ids):
            return model(input_ids=torch.tensor([ids])).logits.item()

        wins = [score(r["chosen_input_ids"]) > score(r["rejected_input_ids"]) for r in rows]
    tuned = report["tuned"]
    assert tuned["pairwise_accuracy"] == pytest.approx(sum(wins) / len(rows))
    assert tuned["score_margin"] == pytest.approx(tuned["score_chosen"] - tuned["score_rejected"], abs=1e-6)
    assert "base" not in report and report["eval_rows"] == len(rows)
    assert (tmp_path / "reports" / "predictions.jsonl").read_text() == ""


def test_missing_eval_split_and_missing_training_are_user_errors(tiny_model_dir, tmp_path):
    layout = Layout.at(tmp_path)
    cfg = config(tiny_model_dir)
    with pytest.raises(TunepipeError, match="no trained model"):
        run_evaluate(cfg, layout)
    make_adapter(tiny_model_dir, layout.adapter)
    with pytest.raises(TunepipeError, match="no tokenized eval split"):
        run_evaluate(cfg, layout)
    from datasets import Dataset, Features, Sequence, Value

    columns = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
    Dataset.from_dict({"input_ids": [], "labels": []}, features=columns).save_to_disk(
        str(tmp_path / "data" / "tokenized" / "eval"))
    with pytest.raises(TunepipeError, match="eval split is empty"):
        run_evaluate(cfg, layout)
    assert not (layout.metrics / "eval.json").exists()
