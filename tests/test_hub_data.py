"""Hub entries of dataset_info.json -> `datasets.load_dataset` calls, and the hub keys' errors.

No server here: the calls are checked as data (and, once, by standing in for load_dataset);
tests/e2e/test_hub_datasets.py reads such entries from the local hub.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.test_registry import write_info
from tunepipe.data.sources import hub_data
from tunepipe.data.sources.registry import get_entries, load_dataset_info
from tunepipe.errors import TunepipeError
from tunepipe.models.hub import is_repo_id, refuse_other_hubs


def expected_call(raw: dict) -> dict:
    """What LLaMA-Factory passes to load_dataset for a hub entry: subset as the config name,
    folder as data_dir, split (default train)."""
    return {"path": raw["hf_hub_url"], "name": raw.get("subset"), "data_dir": raw.get("folder"),
            "split": raw.get("split", "train"), "revision": "main", "streaming": True}


def test_every_hub_only_entry_of_llamafactorys_dataset_info_maps_to_its_load_dataset_call(lf_demo_dir):
    info = load_dataset_info(lf_demo_dir)
    hub_only = {name: raw for name, raw in info.items() if "file_name" not in raw}
    assert len(hub_only) == 90
    calls, refused = {}, {}
    for name, raw in hub_only.items():
        try:
            (entry,) = get_entries([name], lf_demo_dir)
        except TunepipeError as exc:
            refused[name] = str(exc)
            continue
        calls[name] = entry.hub.load_kwargs()
        assert calls[name] == expected_call(raw), name
        assert entry.formatting == raw.get("formatting", "alpaca") and entry.ranking == raw.get("ranking", False)
    # the one entry with only a ModelScope URL: refused, saying how to download it
    assert list(refused) == ["deepctrl"] and "only on ModelScope" in refused["deepctrl"]
    # each way into a repo, by name (not only as the rule above computes it)
    assert calls["llava_1k_en"]["name"] == "en" and calls["dpo_mix_zh"]["name"] == "zh"
    assert calls["starcoder_python"]["data_dir"] == "python"
    assert calls["adgen_eval"]["split"] == "validation" and calls["ultrachat_200k"]["split"] == "train_sft"
    assert calls["alpaca_gpt4_en"] == {"path": "llamafactory/alpaca_gpt4_en", "name": None, "data_dir": None,
                                       "split": "train", "revision": "main", "streaming": True}


def test_validate_reads_a_hub_entry_with_that_call_at_the_resolved_commit(monkeypatch):
    import datasets

    seen = {}

    def fake_load_dataset(**kwargs):
        seen.update(kwargs)
        return iter([{"instruction": "Hi", "output": "Hello"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = hub_data.HubDataset("org/data", subset="en", split="test", folder="sub", revision="v1")
    rows = list(hub_data.stream_rows(hub, "a" * 40, token="hf_secret", cache_dir="/c"))
    assert seen == {"path": "org/data", "name": "en", "data_dir": "sub", "split": "test", "revision": "a" * 40,
                    "streaming": True, "token": "hf_secret", "cache_dir": "/c"}
    assert [r.location() for r in rows] == ["hf://datasets/org/data/sub (subset en, split test):row 0"]


def test_a_modelscope_url_beside_an_hf_one_is_set_aside_in_one_log_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = write_info(tmp_path, {"a": {"hf_hub_url": "org/a", "ms_hub_url": "ms/a", "om_hub_url": "om/a"}})
    (entry,) = get_entries(["a"], folder)
    assert entry.hub.repo_id == "org/a"
    said = [r.getMessage() for r in caplog.records if r.name == "tunepipe.data.sources.hub_data"]
    assert said == [("dataset 'a': reading hf_hub_url 'org/a' (ms_hub_url / om_hub_url not used: tunepipe reads "
                    "the Hugging Face Hub)")]


@pytest.mark.parametrize("raw, message, hint", [
    ({"ms_hub_url": "ms/x"}, "dataset 'x' is only on ModelScope (ms_hub_url='ms/x')",
     ("download it with `modelscope download --dataset ms/x --local_dir {dir}/x` and give the entry \"file_name\": "
     "\"x\"")),
    ({"om_hub_url": "om/x"}, "dataset 'x' is only on Modelers (om_hub_url='om/x')",
     "download it with `git clone https://modelers.cn/datasets/om/x {dir}/x`"),
    ({"script_url": "x.py"}, "dataset 'x': script_url='x.py': dataset loading scripts are not run",
     "convert the data to json / jsonl / parquet files"),
    ({"cloud_file_name": "s3://bucket/x.json"}, "dataset 'x': cloud_file_name='s3://bucket/x.json'",
     "`dvc import-url s3://bucket/x.json {dir}/`"),
])
def test_entries_tunepipe_cannot_read_say_what_to_do(tmp_path, raw, message, hint):
    folder = write_info(tmp_path, {"x": raw})
    with pytest.raises(TunepipeError) as err:
        get_entries(["x"], folder)
    assert err.value.message.startswith(message)
    assert hint.format(dir=folder) in err.value.hint


def test_a_local_file_wins_over_a_hub_url_and_hub_only_keys_are_said_to_be_ignored(tmp_path, caplog):
    folder = write_info(tmp_path, {"a": {"file_name": "a.json", "hf_hub_url": "org/a", "revision": "v1"}},
                        {"a.json": json.dumps([{"instruction": "q", "output": "a"}])})
    (entry,) = get_entries(["a"], folder)
    assert entry.hub is None and entry.file_type == "json"
    assert "revision='v1' only applies to hub datasets" in caplog.text


def test_modelscope_switch_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    with pytest.raises(TunepipeError, match="USE_MODELSCOPE_HUB is set: .* ModelScope is not supported"):
        refuse_other_hubs()


@pytest.mark.parametrize("name, expected", [
    ("Qwen/Qwen3-4B-Instruct-2507", True), ("llamafactory/alpaca_gpt4_en", True), ("gpt2", False),
    ("saves/qwen3-4b/lora/sft", False), ("./models/x", False), ("/abs/x", False), ("org/a..b", False),
])
def test_repo_ids_are_org_slash_name(name, expected):
    assert is_repo_id(name) is expected
