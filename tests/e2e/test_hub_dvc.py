"""The DVC pipeline on a Hub model and a Hub dataset, in a throw-away copy of the repo.

`dvc repro` downloads through the local hub and records the resolved commits; a second
`dvc repro` with HF_HUB_OFFLINE=1 and nothing listening at HF_ENDPOINT runs nothing (DVC
decides from params and hashes, never asking the hub); a new `model_revision` re-runs
base_model, whose manifest then names the other commit (so everything after it re-runs).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from tests.e2e.test_data_stages import REPO, dvc, set_param
from tests.fixtures.hub import MODEL_ID, MODEL_TAG

VENV_BIN = Path(sys.executable).parent


def hub_repo_copy(root: Path, lf_demo_dir: Path) -> Path:
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", "stages", "src", "schemas"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, root / name)
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "README.md").write_text("no local data: alpaca_gpt4_en is on the hub\n")
    entry = json.loads((lf_demo_dir / "dataset_info.json").read_text())["alpaca_gpt4_en"]
    (root / "data" / "dataset_info.json").write_text(json.dumps({"alpaca_gpt4_en": entry}))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["model_name_or_path"] = MODEL_ID
    params["data"].update({"dataset": "alpaca_gpt4_en", "eval_dataset": None})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.slow
def test_dvc_repro_on_hub_inputs_records_commits_reruns_nothing_offline_and_follows_model_revision(
        local_hub, lf_demo_dir, tmp_path, monkeypatch):
    repo = hub_repo_copy(tmp_path / "repo", lf_demo_dir)
    # test_data_stages.run passes os.environ on: point it at the hub, with a cache of our own
    for key, value in local_hub.env(tmp_path / "hf").items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    dvc(repo, "init", "-q", "--no-scm")

    done = dvc(repo, "repro", "base_model", "validate")
    assert "Running stage 'base_model'" in done.stdout and "Running stage 'validate'" in done.stdout
    manifest = json.loads((repo / "models" / "base" / "tunepipe_base.json").read_text())
    assert manifest["source"]["commit"] == local_hub.commits[MODEL_ID]
    report = json.loads((repo / "reports" / "validation.json").read_text())
    assert report["datasets"]["alpaca_gpt4_en"]["hub"]["commit"] == \
        local_hub.commits["datasets/llamafactory/alpaca_gpt4_en"]

    # the hub gone: offline, nothing at the endpoint. Nothing changed, so nothing runs.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    done = dvc(repo, "repro", "base_model", "validate")
    assert "Running stage" not in done.stdout
    assert "'base_model' didn't change" in done.stdout and "'validate' didn't change" in done.stdout

    # a new model_revision: only base_model is out of date, and it resolves the tag's commit
    set_param(repo, "model", "model_revision", MODEL_TAG)
    status = json.loads(dvc(repo, "status", "--json", "base_model", "validate").stdout or "{}")
    assert set(status) == {"base_model"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", local_hub.url)
    done = dvc(repo, "repro", "base_model")
    assert "Running stage 'base_model'" in done.stdout
    manifest = json.loads((repo / "models" / "base" / "tunepipe_base.json").read_text())
    assert manifest["source"]["commit"] == local_hub.tags[MODEL_TAG]
