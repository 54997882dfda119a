"""`tunepipe tokenize` and `tunepipe eval` run their missing earlier steps, as `train` does."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tests.fixtures.adapters import QUESTIONS, make_adapter
from tunepipe.cli import main as tunepipe
from tunepipe.layout import Layout


def write_config(tmp_path: Path, tiny_model_dir: Path, name: str = "cfg.yaml", **extra) -> tuple[Path, Layout]:
    """A flat LLaMA-Factory-style YAML over the tiny model and a six-row alpaca dataset."""
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        rows = [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS]
        (data / "qa.json").write_text(json.dumps(rows, ensure_ascii=False))
        (data / "qa_copy.json").write_text(json.dumps(rows, ensure_ascii=False))
        (data / "dataset_info.json").write_text(json.dumps({"qa": {"file_name": "qa.json"},
                                                            "qa_copy": {"file_name": "qa_copy.json"}}))
    out = tmp_path / "out"
    keys = {"model_name_or_path": str(tiny_model_dir), "dataset": "qa", "dataset_dir": str(data),
            "template": "chatml", "cutoff_len": 128, "val_size": 0.5, "output_dir": str(out),
            "max_new_tokens": 4, "max_predict_samples": 2, "report_to": "none", **extra}
    config = tmp_path / name
    config.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in keys.items()))
    return config, Layout.at(out)


def test_tokenize_before_validate_validates_first(tmp_path, tiny_model_dir, caplog):
    config, layout = write_config(tmp_path, tiny_model_dir)
    assert tunepipe(["tokenize", str(config)]) == 0
    manifest = json.loads((layout.validated / "manifest.json").read_text())
    assert [item["name"] for item in manifest["train"]] == ["qa"]
    meta = json.loads((layout.tokenized / "meta.json").read_text())
    assert meta["rows"] == {"train": 3, "eval": 3}

    # validated rows of another dataset list are stale: validated again, then tokenized
    other, _ = write_config(tmp_path, tiny_model_dir, name="other.yaml", dataset="qa, qa_copy")
    with caplog.at_level(logging.INFO, logger="tunepipe.pipeline"):
        assert tunepipe(["tokenize", str(other)]) == 0
    assert any("validating again" in r.getMessage() for r in caplog.records)
    manifest = json.loads((layout.validated / "manifest.json").read_text())
    assert [item["name"] for item in manifest["train"]] == ["qa", "qa_copy"]
    assert json.loads((layout.tokenized / "meta.json").read_text())["rows"] == {"train": 6, "eval": 6}


def test_eval_on_a_fresh_output_dir_validates_and_tokenizes_first(tmp_path, tiny_model_dir, caplog, capsys):
    """LLaMA-Factory's predict YAML: adapter_name_or_path = the train output_dir, a new output_dir."""
    train_run = tmp_path / "saves" / "sft"
    make_adapter(tiny_model_dir, Layout.at(train_run).adapter)
    config, layout = write_config(tmp_path, tiny_model_dir, adapter_name_or_path=str(train_run))
    assert tunepipe(["eval", str(config)]) == 0
    assert (layout.validated / "manifest.json").is_file() and (layout.tokenized / "meta.json").is_file()
    report = json.loads((layout.metrics / "eval.json").read_text())
    assert report["eval_rows"] == 3 and report["predict_samples"] == 2
    assert report["tuned"]["eval_loss"] != report["base"]["eval_loss"]  # the adapter was applied
    assert "wrote " in capsys.readouterr().out

    with caplog.at_level(logging.INFO, logger="tunepipe.pipeline"):  # second time: nothing redone
        assert tunepipe(["eval", str(config)]) == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "using the validated rows" in said and "using the tokenized shards" in said
    assert "== validate ==" not in said and "== tokenize ==" not in said


def test_a_predict_yaml_needs_no_train_dataset(tmp_path, tiny_model_dir, caplog):
    """LLaMA-Factory's predict YAML names only `eval_dataset`; this data folder has no entry
    for tunepipe's default `dataset: identity`, and none is needed."""
    train_run = tmp_path / "saves" / "sft"
    make_adapter(tiny_model_dir, Layout.at(train_run).adapter)
    config, layout = write_config(tmp_path, tiny_model_dir, adapter_name_or_path=str(train_run),
                                  eval_dataset="qa_copy", val_size=0)
    config.write_text("\n".join(line for line in config.read_text().splitlines()
                                if not line.startswith("dataset:")) + "\n")
    assert tunepipe(["eval", str(config)]) == 0
    manifest = json.loads((layout.validated / "manifest.json").read_text())
    assert [item["name"] for item in manifest["eval"]] == ["qa_copy"]
    assert json.loads((layout.metrics / "eval.json").read_text())["eval_rows"] == len(QUESTIONS)
    with caplog.at_level(logging.INFO, logger="tunepipe.pipeline"):  # second time: reused
        assert tunepipe(["eval", str(config)]) == 0
    assert "using the tokenized shards" in " ".join(r.getMessage() for r in caplog.records)


def test_eval_without_a_trained_model_stops_before_any_data_work(tmp_path, tiny_model_dir, capsys):
    config, layout = write_config(tmp_path, tiny_model_dir)
    assert tunepipe(["eval", str(config)]) == 2
    assert "no trained model" in capsys.readouterr().err
    assert not layout.validated.exists() and not layout.tokenized.exists()


def test_train_refuses_an_adapter_it_would_ignore_before_any_data_work(tmp_path, tiny_model_dir, capsys):
    """LLaMA-Factory's predict YAML is run with `llamafactory-cli train`; given to `tunepipe train`
    it would train a new adapter, so it is refused, pointing at `tunepipe eval`."""
    config, layout = write_config(tmp_path, tiny_model_dir, adapter_name_or_path=str(tmp_path / "saves"),
                                  do_predict=True)
    assert tunepipe(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "cannot continue an existing one" in err and "`tunepipe eval`" in err
    assert not layout.root.exists()
