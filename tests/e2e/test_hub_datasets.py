"""Hub datasets of LLaMA-Factory's own dataset_info.json (read in place, unchanged), validated
from the local hub: one entry with `subset`, one with `folder`, one with a non-train `split`,
one plain. Rows come out exactly as from a local file, each dataset's resolved commit is
recorded, and the failures a user meets are one-line errors that leave no data/validated/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from tests.fixtures.hub import ADGEN, ALPACA, CODE, dpo_rows, rlhf_v_rows
from tests.fixtures.hub_cli import error_lines, errors_per_command, run_batch, run_tunepipe


def write_yaml(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def validated(out: Path, name: str) -> list[dict]:
    path = out / "data" / "validated" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


LF_RUNS = {"sft": ("alpaca_gpt4_en,adgen_eval", "sft"), "dpo": ("dpo_mix_en", "dpo"),
           "pt": ("starcoder_python", "pt"), "rlhf_v": ("rlhf_v", "dpo")}


def failing_entries(adgen_commit: str) -> dict[str, dict]:
    return {"bad_row": {"hf_hub_url": "llamafactory/alpaca_gpt4_zh"},
            "no_repo": {"hf_hub_url": "nobody/no-such-data"},
            "no_split": {"hf_hub_url": "HasturOfficial/adgen", "split": "test"},
            "no_subset": {"hf_hub_url": "llamafactory/DPO-En-Zh-20k", "subset": "fr", "ranking": True,
                          "formatting": "sharegpt"},
            "no_revision": {"hf_hub_url": "HasturOfficial/adgen", "revision": "no-such-tag"},
            "pinned": {"hf_hub_url": "HasturOfficial/adgen", "split": "validation", "revision": adgen_commit,
                       "columns": {"prompt": "content", "response": "summary"}}}


@pytest.fixture(scope="module")
def validate_runs(local_hub, lf_demo_dir, tmp_path_factory):
    """Every validate run of this module in one child process (keep going past failures): LLaMA-Factory's
    entries from its dataset_info.json, then entries of our own that fail, each in its output_dir."""
    root = tmp_path_factory.mktemp("hub-validate")
    commands, names = [], []
    for key, (dataset, stage) in LF_RUNS.items():
        cfg = write_yaml(root / f"{key}.yaml", dataset=dataset, stage=stage, dataset_dir=str(lf_demo_dir),
                         output_dir=str(root / key))
        commands.append(["validate", str(cfg)])
        names.append(key)
    info = failing_entries(local_hub.commits["datasets/HasturOfficial/adgen"])
    (root / "data").mkdir()
    (root / "data" / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    for name in info:
        cfg = write_yaml(root / f"{name}.yaml", dataset=name, stage="dpo" if name == "no_subset" else "sft",
                         dataset_dir=str(root / "data"), output_dir=str(root / name))
        commands.append(["validate", str(cfg)])
        names.append(name)
    done = run_batch(local_hub.env(root / "hf"), commands, cwd=root, keep_going=True)
    return root, done, dict(zip(names, errors_per_command(done)))


def test_llamafactory_hub_entries_validate_from_the_hub_at_a_recorded_commit(local_hub, validate_runs):
    tmp_path, done, results = validate_runs
    assert [results[key] for key in LF_RUNS] == [(0, [])] * len(LF_RUNS), done.stderr[-3000:]

    # plain (a JSON array at the root) and split: validation (parquet files under data/)
    sft = validated(tmp_path / "sft", "alpaca_gpt4_en")
    assert [row["messages"][0]["content"] for row in sft] == [r["instruction"] for r in ALPACA]
    assert sft[0]["_source"] == "hf://datasets/llamafactory/alpaca_gpt4_en (split train):0"
    adgen = validated(tmp_path / "sft", "adgen_eval")  # columns prompt: content, response: summary
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in adgen] == \
        [(r["content"], r["summary"]) for r in ADGEN["validation"]]
    # subset en of a repo with two subsets
    dpo = validated(tmp_path / "dpo", "dpo_mix_en")
    assert [r["chosen"]["content"] for r in dpo] == [r["chosen"]["value"] for r in dpo_rows("en", 4)]
    # folder python of a repo with one folder per language
    assert [r["text"] for r in validated(tmp_path / "pt", "starcoder_python")] == CODE["python"]
    # pictures held in the dataset: stored once each in data/validated/media/<sha256>.png
    held = [row["images"][0] for row in rlhf_v_rows()]
    refs = [row["images"][0] for row in validated(tmp_path / "rlhf_v", "rlhf_v")]
    assert [ref["sha256"] for ref in refs] == [hashlib.sha256(image["bytes"]).hexdigest() for image in held]
    store = tmp_path / "rlhf_v" / "data" / "validated" / "media"
    assert sorted(p.name for p in store.iterdir()) == sorted({f"{ref['sha256']}.png" for ref in refs}) and \
        all((store / ref["path"]).read_bytes() == image["bytes"] and ref["stored"] for ref, image in zip(refs, held))

    report = json.loads((tmp_path / "sft" / "reports" / "validation.json").read_text())
    assert report["datasets"]["adgen_eval"]["hub"] == {
        "repo_id": "HasturOfficial/adgen", "subset": None, "split": "validation", "folder": None,
        "revision": "main", "commit": local_hub.commits["datasets/HasturOfficial/adgen"]}
    pt_report = json.loads((tmp_path / "pt" / "reports" / "validation.json").read_text())
    assert pt_report["datasets"]["starcoder_python"]["hub"]["folder"] == "python"


def test_hub_dataset_failures_are_one_line_errors_and_leave_no_validated_rows(local_hub, validate_runs):
    tmp_path, done, results = validate_runs
    adgen_commit = local_hub.commits["datasets/HasturOfficial/adgen"]
    info = failing_entries(adgen_commit)
    assert results["pinned"] == (0, [])
    assert json.loads((tmp_path / "pinned" / "reports" / "validation.json").read_text()
                      )["datasets"]["pinned"]["hub"]["revision"] == adgen_commit
    assert results["bad_row"] == (2, ["error: 1 invalid row in bad_row (data.on_invalid: error)"])
    assert "  hf://datasets/llamafactory/alpaca_gpt4_zh (split train):row 1: " in done.stderr
    repo = "dataset repo 'nobody/no-such-data' (revision 'main')"
    assert results["no_repo"] == (2, [(f"error: {repo} not found on {local_hub.url}, or it is private or gated "
                                      "and no token was given")])
    assert results["no_split"] == (2, [("error: dataset repo 'HasturOfficial/adgen' (revision 'main'): Bad split: "
                                       "test. Available splits: ['train', 'validation']")])
    assert results["no_subset"] == (2, [("error: dataset repo 'llamafactory/DPO-En-Zh-20k' (revision 'main'): "
                                        "BuilderConfig 'fr' not found. Available: ['en', 'zh']")])
    assert results["no_revision"][1][0].startswith(
        "error: dataset repo 'HasturOfficial/adgen' (revision 'no-such-tag'): no such revision")
    for name in info:
        if name != "pinned":
            assert not (tmp_path / name / "data" / "validated").exists(), name

    # offline: a hub dataset is streamed, never cached, so the error says HF_HUB_OFFLINE is set
    offline = run_tunepipe(local_hub.env(tmp_path / "hf", HF_HUB_OFFLINE="1"), "validate",
                           str(tmp_path / "pinned.yaml"), "output_dir=" + str(tmp_path / "offline"), cwd=tmp_path)
    assert offline.returncode == 2
    assert error_lines(offline) == [
        (f"error: dataset repo 'HasturOfficial/adgen' (revision '{adgen_commit}'): HF_HUB_OFFLINE is set, and a hub "
        f"dataset is streamed from the hub ({local_hub.url}), never cached")]
    assert not (tmp_path / "offline" / "data" / "validated").exists()
