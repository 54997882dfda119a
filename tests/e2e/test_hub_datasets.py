"""Hub datasets of LLaMA-Factory's own dataset_info.json (read in place, unchanged), validated
from the local hub: one entry with `subset`, one with `folder`, one with a non-train `split`,
one plain. Rows come out exactly as from a local file, each dataset's resolved commit is
recorded, and the failures a user meets are one-line errors that leave no data/validated/.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from tests.fixtures.hub import ADGEN, ALPACA, CODE, dpo_rows
from tests.fixtures.hub_cli import error_lines, errors_per_command, run_batch, run_tunepipe


def write_yaml(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def validated(out: Path, name: str) -> list[dict]:
    path = out / "data" / "validated" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_llamafactory_hub_entries_validate_from_the_hub_at_a_recorded_commit(local_hub, lf_demo_dir, tmp_path):
    runs = {"sft": ("alpaca_gpt4_en,adgen_eval", "sft"), "dpo": ("dpo_mix_en", "dpo"), "pt": ("starcoder_python", "pt")}
    commands = []
    for key, (dataset, stage) in runs.items():
        cfg = write_yaml(tmp_path / f"{key}.yaml", dataset=dataset, stage=stage, dataset_dir=str(lf_demo_dir),
                         output_dir=str(tmp_path / key))
        commands.append(["validate", str(cfg)])
    done = run_batch(local_hub.env(tmp_path / "hf"), commands, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

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

    report = json.loads((tmp_path / "sft" / "reports" / "validation.json").read_text())
    assert report["datasets"]["adgen_eval"]["hub"] == {
        "repo_id": "HasturOfficial/adgen", "subset": None, "split": "validation", "folder": None,
        "revision": "main", "commit": local_hub.commits["datasets/HasturOfficial/adgen"]}
    pt_report = json.loads((tmp_path / "pt" / "reports" / "validation.json").read_text())
    assert pt_report["datasets"]["starcoder_python"]["hub"]["folder"] == "python"


def test_hub_dataset_failures_are_one_line_errors_and_leave_no_validated_rows(local_hub, tmp_path):
    adgen_commit = local_hub.commits["datasets/HasturOfficial/adgen"]
    info = {"bad_row": {"hf_hub_url": "llamafactory/alpaca_gpt4_zh"},
            "no_repo": {"hf_hub_url": "nobody/no-such-data"},
            "no_split": {"hf_hub_url": "HasturOfficial/adgen", "split": "test"},
            "no_subset": {"hf_hub_url": "llamafactory/DPO-En-Zh-20k", "subset": "fr", "ranking": True,
                          "formatting": "sharegpt"},
            "no_revision": {"hf_hub_url": "HasturOfficial/adgen", "revision": "no-such-tag"},
            "pinned": {"hf_hub_url": "HasturOfficial/adgen", "split": "validation", "revision": adgen_commit,
                       "columns": {"prompt": "content", "response": "summary"}}}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    stages = {"no_subset": "dpo"}
    commands = [["validate", str(write_yaml(tmp_path / f"{name}.yaml", dataset=name, stage=stages.get(name, "sft"),
                                            dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path / name)))]
                for name in info]
    done = run_batch(local_hub.env(tmp_path / "hf"), commands, cwd=tmp_path, keep_going=True)
    results = dict(zip(info, errors_per_command(done)))
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
