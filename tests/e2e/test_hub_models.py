"""Base models by Hub repo id, against the local hub (olah on 127.0.0.1); adapters by repo id
are merged in tests/e2e/test_hub_llamafactory_examples.py (in its child process).

Each command runs as a user runs it: `tunepipe ...` in a child process whose environment
names the hub (HF_ENDPOINT) and an empty cache of its own (HF_HOME), so huggingface_hub's
real settings are what is tested. The failures a user meets each end in one `error:` line
naming the repo, and leave nothing in models/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.fixtures.hub import (
    ADAPTER_ID,
    MODEL_ID,
    MODEL_TAG,
    PICKLE_ID,
    PRIVATE_ID,
    dropping_proxy,
    gated_hub,
)
from tests.fixtures.hub_cli import error_lines, run_tunepipe

MANIFEST = "tunepipe_base.json"


def write_yaml(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def base_manifest(out: Path) -> dict:
    return json.loads((out / "models" / "base" / MANIFEST).read_text(encoding="utf-8"))


def snapshot_files(hf_home: Path, commit: str) -> set[str]:
    snapshot = hf_home / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots" / commit
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


def test_a_repo_id_base_model_records_repo_revision_and_commit_and_fetches_only_safetensors(local_hub, tmp_path):
    env, out = local_hub.env(tmp_path / "hf"), tmp_path / "out"
    cfg = write_yaml(tmp_path / "m.yaml", model_name_or_path=MODEL_ID, output_dir=str(out))

    done = run_tunepipe(env, "base-model", str(cfg), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    main = local_hub.commits[MODEL_ID]
    assert base_manifest(out) == {"source": {"kind": "hub", "repo_id": MODEL_ID, "revision": "main", "commit": main},
                                  "dtype": "float32"}
    fetched = snapshot_files(tmp_path / "hf", main)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= fetched
    assert not {"pytorch_model.bin", "original/consolidated.pth", "README.md"} & fetched  # pickle and extras stay
    assert "HTTP Request" not in done.stderr  # the HTTP client's per-request lines are kept out of the log

    # a tag resolves to its own commit; the manifest (a DVC output) changes with it
    done = run_tunepipe(env, "base-model", str(cfg), f"model_revision={MODEL_TAG}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert base_manifest(out)["source"]["commit"] == local_hub.tags[MODEL_TAG] != main

    # offline, with nothing listening at the endpoint: the cache alone resolves main again
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = run_tunepipe(offline, "base-model", str(cfg), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert base_manifest(out)["source"]["commit"] == main


FAILURES = {
    "no such repo": ({"model_name_or_path": "nobody/no-such-model"}, {},
                     ("error: model repo 'nobody/no-such-model' (revision 'main') not found on {url}, or it is "
                     "private or gated and no token was given")),
    "no such revision": ({"model_revision": "no-such-branch"}, {},
                         (f"error: model repo '{MODEL_ID}' (revision 'no-such-branch'): no such revision (branch, "
                         f"tag or commit) in '{MODEL_ID}'")),
    "private without a token": ({"model_name_or_path": PRIVATE_ID}, {},
                                (f"error: model repo '{PRIVATE_ID}' (revision 'main') not found on {{url}}, or it is "
                                "private or gated and no token was given")),
    "pickle weights only": ({"model_name_or_path": PICKLE_ID}, {},
                            (f"error: model repo '{PICKLE_ID}' (revision 'main'): has only pickle weights "
                            "(pytorch_model.bin), no .safetensors")),
    "a file missing (an adapter repo named as the model)": ({"model_name_or_path": ADAPTER_ID}, {},
                                                            (f"error: model repo '{ADAPTER_ID}' (revision 'main'): "
                                                            "has no config.json")),
    "offline with an empty cache": ({}, {"HF_HUB_OFFLINE": "1"},
                                    (f"error: model repo '{MODEL_ID}' (revision 'main') is not in the cache "
                                    "({hf_home}/hub) and HF_HUB_OFFLINE is set")),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_hub_failures_are_one_line_errors_and_leave_nothing(local_hub, tmp_path, case):
    keys, extra_env, expected = FAILURES[case]
    env, out = local_hub.env(tmp_path / "hf", **extra_env), tmp_path / "out"
    cfg = write_yaml(tmp_path / "m.yaml", **{"model_name_or_path": MODEL_ID, "output_dir": str(out), **keys})

    done = run_tunepipe(env, "base-model", str(cfg), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert error_lines(done) == [expected.format(url=local_hub.url, hf_home=tmp_path / "hf")], done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "models").exists() or not any((out / "models").iterdir())  # no half-written models/base


def test_a_gated_repo_without_a_token_says_so_and_how_to_log_in(local_hub, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "m.yaml", model_name_or_path=MODEL_ID, output_dir=str(out))
    with gated_hub() as url:
        done = run_tunepipe(local_hub.env(tmp_path / "hf", HF_ENDPOINT=url), "base-model", str(cfg), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert error_lines(done) == [f"error: model repo '{MODEL_ID}' (revision 'main') is gated: no token was given"]
    assert "hint: log in with `hf auth login`, or set HF_TOKEN" in done.stderr
    assert not (out / "models").exists()


def test_a_dropped_connection_is_one_line_leaves_nothing_and_the_rerun_completes(local_hub, tmp_path):
    hf_home, out = tmp_path / "hf", tmp_path / "out"
    cfg = write_yaml(tmp_path / "m.yaml", model_name_or_path=MODEL_ID, output_dir=str(out))
    with dropping_proxy(local_hub.url) as url:
        done = run_tunepipe(local_hub.env(hf_home, HF_ENDPOINT=url), "base-model", str(cfg), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert error_lines(done) == [(f"error: model repo '{MODEL_ID}' (revision 'main'): the connection to {url} "
                                 "failed (RemoteProtocolError); nothing was written to the stage's output")]
    assert not (out / "models").exists()
    # huggingface_hub retried the cut file in place (from where it stopped) before giving up; the
    # files that did complete stay in the cache for the next run, the cut one does not
    kept = snapshot_files(hf_home, local_hub.commits[MODEL_ID])
    assert "config.json" in kept and "model.safetensors" not in kept

    done = run_tunepipe(local_hub.env(hf_home), "base-model", str(cfg), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert base_manifest(out)["source"]["commit"] == local_hub.commits[MODEL_ID]
    assert "model.safetensors" in snapshot_files(hf_home, local_hub.commits[MODEL_ID])
