"""LLaMA-Factory's `tokenized_path` through `tunepipe train`: the first run tokenizes and saves the
shards there, a later run reuses them without reading the data (its dataset may even be gone)."""

from __future__ import annotations

import json
import logging

import pytest

from tests.test_pipeline import write_config
from tunepipe.cli import main as tunepipe
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout


def test_train_saves_the_shards_then_reuses_them(tmp_path, tiny_model_dir, caplog):
    saved = tmp_path / "saves" / "dataset" / "sft"
    config, first = write_config(tmp_path, tiny_model_dir, tokenized_path=str(saved), max_steps=1,
                                 finetuning_type="lora")
    assert tunepipe(["train", str(config)]) == 0
    meta = json.loads((saved / "meta.json").read_text())
    assert meta == json.loads((first.tokenized / "meta.json").read_text()) and meta["rows"]["train"] == 3
    assert json.loads((saved / "data.json").read_text())["stage"] == "sft"

    # a second run elsewhere, naming a dataset that does not exist: the saved shards are used as they are
    second = Layout.at(tmp_path / "second")
    (tmp_path / "second.yaml").write_text(config.read_text().replace('"qa"', '"no_such_dataset"')
                                          .replace(str(first.root), str(second.root)))
    with caplog.at_level(logging.INFO):
        assert tunepipe(["train", str(tmp_path / "second.yaml")]) == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "== tokenize ==" not in said and "== validate ==" not in said and "using the tokenized shards" in said
    assert json.loads((second.tokenized / "meta.json").read_text()) == meta
    assert json.loads((second.metrics / "train.json").read_text())["steps"] == 1
    assert (second.metrics / "data.json").is_file()


def test_a_folder_without_shards_is_refused(tmp_path, tiny_model_dir):
    other = tmp_path / "not-shards"
    other.mkdir()
    (other / "dataset_dict.json").write_text("{}")  # what LLaMA-Factory's save_to_disk writes
    config, _ = write_config(tmp_path, tiny_model_dir, tokenized_path=str(other), max_steps=1)
    from tunepipe.config.loader import load_config
    from tunepipe.data.tokenizing.tokenized_path import saved_shards

    with pytest.raises(TunepipeError, match="holds no tunepipe shards"):
        saved_shards(load_config(config))
