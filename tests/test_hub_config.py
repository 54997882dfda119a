"""LLaMA-Factory's hub keys load, and a token never leaves the config object.

The end-to-end check (every file a run writes, mlflow.db included, grepped for the token)
is in tests/e2e/test_hub_llamafactory_examples.py; these are the places it is kept out of.
"""

from __future__ import annotations

import pytest
import yaml

from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError

TOKEN = "hf_unitTestSecretToken0123456789"


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_llamafactory_hub_keys_load(tmp_path):
    cfg = load_config(write(tmp_path, "model_name_or_path: Qwen/Qwen3-4B-Instruct-2507\nmodel_revision: v1.0\n"
                                      f"cache_dir: /big/cache\nhf_hub_token: {TOKEN}\n"))
    assert (cfg.model.model_revision, cfg.model.cache_dir, cfg.model.hf_hub_token) == ("v1.0", "/big/cache", TOKEN)
    assert load_config().model.model_revision == "main"


@pytest.mark.parametrize("key", ["push_to_hub", "export_hub_model_id"])
def test_uploads_are_refused_with_the_hf_upload_command(tmp_path, key):
    with pytest.raises(TunepipeError, match=r"hf upload ORG/NAME EXPORT_DIR"):
        load_config(write(tmp_path, f"{key}: org/name\n"))


def test_the_token_is_not_a_tracked_param(tmp_path):
    from tunepipe.tracking.tracker import flatten_params

    params = flatten_params(load_config(write(tmp_path, f"hf_hub_token: {TOKEN}\n")))
    assert "model.model_revision" in params and "model.hf_hub_token" not in params
    assert TOKEN not in repr(params)


def test_the_token_reaches_launched_workers_by_environment_not_by_file(tmp_path):
    from tunepipe.train.parallel.launch import dump_config

    cfg = load_config(write(tmp_path, f"hf_hub_token: {TOKEN}\n"))
    dumped = dump_config(cfg, tmp_path / "config.yaml")
    assert TOKEN not in dumped.read_text(encoding="utf-8")
    assert "hf_hub_token" not in yaml.safe_load(dumped.read_text(encoding="utf-8"))["model"]
    assert load_config(dumped).model.hf_hub_token is None  # what a worker reads back; HF_TOKEN carries it


def test_a_bad_token_value_is_not_echoed_in_the_error(tmp_path):
    with pytest.raises(TunepipeError) as err:
        load_config(write(tmp_path, f"hf_hub_token: [{TOKEN}]\n"))
    assert str(err.value).startswith("model.hf_hub_token=<hidden>: expected a string")
    assert TOKEN not in str(err.value)
