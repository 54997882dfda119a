"""dataset_info.json: LLaMA-Factory entries, merged columns/tags, file resolution, hub entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.data.checks.schemas import load_schema, schema_dir
from tunepipe.data.sources.registry import get_entries, load_dataset_info, parse_names
from tunepipe.errors import TunepipeError


def write_info(folder: Path, info: dict, files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    for name, text in (files or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def test_every_schema_file_is_valid_json_schema_2020_12():
    import jsonschema

    names = sorted(p.stem for p in schema_dir().glob("*.json"))
    assert {"alpaca_sft", "alpaca_preference", "sharegpt_sft", "sharegpt_preference", "kto", "openai",
            "pretrain", "dataset_info"} <= set(names)
    for name in names:
        schema = load_schema(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)


def test_lf_demo_local_entries_resolve_and_hub_entries_name_their_hub_dataset(lf_demo_dir):
    info = load_dataset_info(lf_demo_dir)  # the real file passes our dataset_info schema unchanged
    local = [name for name, entry in info.items()
             if "file_name" in entry and (lf_demo_dir / entry["file_name"]).exists()]
    assert {"identity", "alpaca_en_demo", "glaive_toolcall_en_demo", "dpo_en_demo", "kto_en_demo",
            "c4_demo"} <= set(local)
    entries = {e.name: e for e in get_entries(local, lf_demo_dir)}
    assert entries["glaive_toolcall_en_demo"].columns["tools"] == "tools"
    assert entries["dpo_en_demo"].ranking and entries["dpo_en_demo"].kind("dpo") == "preference"
    assert entries["kto_en_demo"].kind("kto") == "kto"
    assert entries["c4_demo"].kind("pt") == "pretrain" and entries["c4_demo"].file_type == "jsonl"
    (hub,) = get_entries(["alpaca_en"], lf_demo_dir)  # no file: read from the Hub (tests/test_hub_data.py)
    assert hub.files == [] and hub.file_type == "hub" and hub.hub.repo_id == "llamafactory/alpaca_en"
    assert hub.describe_files(lf_demo_dir) == "hf://datasets/llamafactory/alpaca_en (split train)"


def test_user_columns_and_tags_are_merged_with_the_defaults(tmp_path):
    folder = write_info(tmp_path, {
        "a": {"file_name": "a.json", "columns": {"prompt": "question", "system": "sys"}},
        "s": {"file_name": "s.json", "formatting": "sharegpt", "tags": {"user_tag": "user"}},
    }, {"a.json": "[]", "s.json": "[]"})
    alpaca, sharegpt = get_entries("a, s", folder)  # LLaMA-Factory's comma-separated form
    # LLaMA-Factory would drop query/response here (its columns replace the defaults)
    assert alpaca.columns == {"prompt": "question", "query": "input", "response": "output", "system": "sys"}
    assert alpaca.user_columns == {"prompt", "system"}
    assert sharegpt.tags["user_tag"] == "user" and sharegpt.tags["assistant_tag"] == "gpt"
    assert sharegpt.columns["messages"] == "conversations"


def test_dataset_names_list_or_comma_string():
    assert parse_names("a, b,,c ") == ["a", "b", "c"]
    assert parse_names(["a", " b"]) == ["a", "b"]
    assert parse_names(None) == []


@pytest.mark.parametrize("file_name", ["../outside.json", "/etc/passwd", "sub/../../outside.json"])
def test_file_name_must_stay_inside_dataset_dir(tmp_path, file_name):
    (tmp_path / "outside.json").write_text("[]")
    folder = write_info(tmp_path / "data", {"x": {"file_name": file_name}})
    with pytest.raises(TunepipeError, match="points outside"):
        get_entries(["x"], folder)


def test_folder_of_same_type_files(tmp_path):
    folder = write_info(tmp_path, {"f": {"file_name": "parts"}, "m": {"file_name": "mixed"}},
                        {"parts/b.jsonl": "{}\n", "parts/a.jsonl": "{}\n", "mixed/a.json": "[]",
                         "mixed/b.csv": "x\n"})
    (entry,) = get_entries(["f"], folder)
    assert [p.name for p in entry.files] == ["a.jsonl", "b.jsonl"] and entry.file_type == "jsonl"
    with pytest.raises(TunepipeError, match="mixes file types"):
        get_entries(["m"], folder)


def test_entry_errors_name_the_entry(tmp_path):
    folder = write_info(tmp_path, {"gone": {"file_name": "gone.json"},
                                   "split": {"file_name": "a.json", "split": "test"},
                                   "odd": {"file_name": "a.xml"}}, {"a.json": "[]", "a.xml": ""})
    with pytest.raises(TunepipeError, match=r"'gone'.*gone.json not found"):
        get_entries(["gone"], folder)
    with pytest.raises(TunepipeError, match=r"'split'.*single split"):
        get_entries(["split"], folder)
    with pytest.raises(TunepipeError, match="unsupported file type"):
        get_entries(["odd"], folder)
    with pytest.raises(TunepipeError, match=r"'nope' is not in"):
        get_entries(["nope"], folder)


def test_dataset_info_is_schema_checked(tmp_path):
    folder = write_info(tmp_path, {"x": {"file_name": "a.json", "colums": {"prompt": "q"}},
                                   "y": {"file_name": "a.json", "formatting": "markdown"}})
    with pytest.raises(TunepipeError) as err:
        load_dataset_info(folder)
    assert "/x" in str(err.value) and "colums" in str(err.value) and "/y/formatting" in str(err.value)


def test_dataset_info_json_errors_report_line_and_column(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "x": {"file_name": }\n}')
    with pytest.raises(TunepipeError, match="line 2 column"):
        load_dataset_info(tmp_path)


def test_txt_files_read_their_text_column_by_default(tmp_path):
    folder = write_info(tmp_path, {"w": {"file_name": "wiki.txt"}}, {"wiki.txt": "one\n\ntwo\n"})
    (entry,) = get_entries(["w"], folder)
    assert entry.columns["prompt"] == "text" and entry.file_type == "txt"
