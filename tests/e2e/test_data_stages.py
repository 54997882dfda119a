"""validate and tokenize as DVC stages, in a throw-away copy of the repo with hand-written data.

A forced re-run of tokenize gives the same DVC hash (byte-identical shards); a training
knob leaves both data stages up to date; a bad row fails the validate stage script
with exit code 2 and the row's location.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ROWS = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."}
        for i in range(12)]
CHAT = [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "Hello!"},
                           {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye!"}]}
        for i in range(6)]


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd / "src"),
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], repo, check)


def locked_md5(repo: Path, stage: str, out: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


def set_param(repo: Path, group: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[group][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory, tiny_model_dir) -> Path:
    repo = tmp_path_factory.mktemp("data-repo")
    for name in ("dvc.yaml", "params.yaml", "stages", "src", "schemas"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, repo / name)
    raw = repo / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "sums.json").write_text(json.dumps(ROWS))
    (raw / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CHAT))
    (repo / "data" / "dataset_info.json").write_text(json.dumps({
        "sums": {"file_name": "raw/sums.json"},
        "chat": {"file_name": "raw/chat.jsonl", "formatting": "sharegpt"}}))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["model_name_or_path"] = str(tiny_model_dir)
    params["data"].update({"dataset": "sums,chat", "eval_dataset": None, "val_size": 0.25, "cutoff_len": 96,
                           "packing": True})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], repo)
    dvc(repo, "init", "-q")
    dvc(repo, "repro", "tokenize")
    return repo


@pytest.mark.slow
def test_tokenize_stage_outputs_and_byte_identical_rerun(data_repo):
    metrics = json.loads((data_repo / "metrics" / "data.json").read_text())
    assert metrics["train"]["rows_in"] + metrics["eval"]["rows_in"] == len(ROWS) + len(CHAT)
    assert 0 < metrics["train"]["packing_efficiency"] <= 1
    report = json.loads((data_repo / "reports" / "validation.json").read_text())
    assert report["invalid"] == 0 and set(report["datasets"]) == {"sums", "chat"}
    before = locked_md5(data_repo, "tokenize", "data/tokenized")
    dvc(data_repo, "repro", "-f", "tokenize", "--single-item")
    assert locked_md5(data_repo, "tokenize", "data/tokenized") == before
    assert json.loads(dvc(data_repo, "status", "--json", "validate", "tokenize").stdout or "{}") == {}


@pytest.mark.slow
def test_a_training_knob_leaves_the_data_stages_up_to_date(data_repo):
    set_param(data_repo, "train", "learning_rate", 0.123)
    assert json.loads(dvc(data_repo, "status", "--json", "validate", "tokenize").stdout or "{}") == {}
    set_param(data_repo, "data", "cutoff_len", 128)
    changed = json.loads(dvc(data_repo, "status", "--json", "validate", "tokenize").stdout or "{}")
    assert set(changed) == {"tokenize"}
    set_param(data_repo, "data", "cutoff_len", 96)


@pytest.mark.slow
def test_a_bad_row_fails_the_validate_stage_with_exit_code_2(data_repo):
    bad = data_repo / "data" / "raw" / "chat.jsonl"
    original = bad.read_text()
    try:
        bad.write_text(original + json.dumps({"conversations": [{"from": "gpt", "value": "x"}]}) + "\n")
        proc = run([sys.executable, "stages/validate.py"], data_repo, check=False)
        assert proc.returncode == 2
        assert "chat.jsonl:row 6 (line 7): /conversations/0/from" in proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    finally:
        bad.write_text(original)
