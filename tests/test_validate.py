"""validate: every LLaMA-Factory demo entry passes; each kind of bad input gets its own precise error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_registry import write_info
from tunepipe.cli import main as cli_main
from tunepipe.config.loader import load_config
from tunepipe.data.checks.validated import read_manifest, read_validated
from tunepipe.data.validate import run_validate
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout

DEMO = [("sft", "identity"), ("sft", "alpaca_en_demo"), ("sft", "glaive_toolcall_en_demo"),
        ("dpo", "dpo_en_demo"), ("kto", "kto_en_demo"), ("pt", "c4_demo")]


def config(dataset_dir, dataset, stage="sft", **data):
    overrides = [f"data.dataset={dataset}", f"data.dataset_dir={dataset_dir}", f"train.stage={stage}"]
    overrides += [f"data.{key}={value}" for key, value in data.items()]
    return load_config(None, overrides)


def validate(tmp_path, dataset_dir, dataset, stage="sft", **data):
    return run_validate(config(dataset_dir, dataset, stage, **data), Layout.at(tmp_path / "out"))


def sharegpt(*turns, **extra):
    return {"conversations": [{"from": role, "value": text} for role, text in turns], **extra}


def jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize("stage,name", DEMO)
def test_lf_demo_entries_validate_with_zero_invalid_rows(tmp_path, lf_demo_dir, stage, name):
    report = validate(tmp_path, lf_demo_dir, name, stage)
    assert report["invalid"] == 0 and report["valid"] == report["rows_read"] > 0
    validated = Layout.at(tmp_path / "out").validated
    (item,) = read_manifest(validated)["train"]
    rows = read_validated(validated, item)
    assert item["rows"] == len(rows) == report["valid"]
    assert item["kind"] == {"sft": "sft", "dpo": "preference", "kto": "kto", "pt": "pretrain"}[stage]
    assert (tmp_path / "out" / "reports" / "rejected.jsonl").read_text() == ""


def test_canonical_rows_of_the_demo_formats(tmp_path, lf_demo_dir):
    validate(tmp_path, lf_demo_dir, "glaive_toolcall_en_demo")
    validated = Layout.at(tmp_path / "out").validated
    rows = read_validated(validated, read_manifest(validated)["train"][0])
    source = json.loads((lf_demo_dir / "glaive_toolcall_en_demo.json").read_text())
    names = {"human": "user", "gpt": "assistant", "function_call": "function_call", "observation": "observation"}
    for row, raw in zip(rows, source):
        assert row["messages"] == [{"role": names[m["from"]], "content": m["value"]} for m in raw["conversations"]]
        assert row["tools"] == raw["tools"] and row["system"] == ""
    dpo = tmp_path / "dpo"
    validate(dpo, lf_demo_dir, "dpo_en_demo", "dpo")
    rows = read_validated(Layout.at(dpo / "out").validated, {"file": "dpo_en_demo.jsonl"})
    with_system = next(r for r in rows if r["system"])  # a leading system turn is lifted into `system`
    assert with_system["messages"][0]["role"] == "user"
    assert all(r["chosen"]["role"] == "assistant" and r["chosen"] != r["rejected"] for r in rows)


def test_alpaca_history_system_and_query_become_messages(tmp_path):
    row = {"instruction": "Add", "input": "2 and 2", "output": "4", "sys": "be exact",
           "hist": [["hi", "hello"]]}
    folder = write_info(tmp_path / "d", {"a": {"file_name": "a.json",
                                               "columns": {"system": "sys", "history": "hist"}}},
                        {"a.json": json.dumps([row])})
    validate(tmp_path, folder, "a")
    (canonical,) = read_validated(Layout.at(tmp_path / "out").validated, {"file": "a.jsonl"})
    assert canonical["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                     {"role": "user", "content": "Add\n2 and 2"},
                                     {"role": "assistant", "content": "4"}]
    assert canonical["system"] == "be exact" and canonical["tools"] == "" and canonical["_source"].endswith(":0")


def test_openai_tool_calls_and_tool_results(tmp_path):
    row = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"},
        {"role": "assistant", "content": "Sunny and warm."}], "tools": [{"name": "get"}]}
    folder = write_info(tmp_path / "d", {"o": {"file_name": "o.jsonl", "formatting": "openai",
                                               "columns": {"tools": "tools"}}}, {"o.jsonl": jsonl(row)})
    validate(tmp_path, folder, "o")
    (canonical,) = read_validated(Layout.at(tmp_path / "out").validated, {"file": "o.jsonl"})
    assert canonical["system"] == "sys" and json.loads(canonical["tools"]) == [{"name": "get"}]
    assert canonical["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "function_call", "content": json.dumps({"name": "get", "arguments": {"city": "Paris"}})},
        {"role": "observation", "content": "sunny\nwarm"},
        {"role": "assistant", "content": "Sunny and warm."}]


@pytest.mark.parametrize("file_name,content", [
    ("t.csv", "instruction,input,output\nhi,,hello\n\"multi\nline\",x,y\n"),
    ("t.parquet", None), ("t.arrow", None)])
def test_csv_parquet_and_arrow_files(tmp_path, file_name, content):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "d"
    folder.mkdir()
    table = pa.table({"instruction": ["hi", "multi\nline"], "input": ["", "x"], "output": ["hello", "y"]})
    if file_name.endswith(".parquet"):
        pq.write_table(table, folder / file_name)
    elif file_name.endswith(".arrow"):
        with pa.ipc.new_stream(folder / file_name, table.schema) as writer:
            writer.write_table(table)
    write_info(folder, {"t": {"file_name": file_name}}, {file_name: content} if content else {})
    report = validate(tmp_path, folder, "t")
    assert report["valid"] == 2
    rows = read_validated(Layout.at(tmp_path / "out").validated, {"file": "t.jsonl"})
    assert rows[1]["messages"][0]["content"] == "multi\nline\nx"


# -- bad input: each gets its own precise error -----------------------------------


def bad_row_report(tmp_path, rows, entry=None, stage="sft", file_name="bad.jsonl"):
    entry = entry or {"file_name": file_name, "formatting": "sharegpt", "columns": {"tools": "tools"}}
    folder = write_info(tmp_path / "d", {"bad": entry}, {file_name: jsonl(*rows)})
    with pytest.raises(TunepipeError) as err:
        validate(tmp_path, folder, "bad", stage)
    report = json.loads((tmp_path / "out" / "reports" / "validation.json").read_text())
    return str(err.value), report["datasets"]["bad"]["errors"]


GOOD = sharegpt(("human", "hi"), ("gpt", "hello"), tools="")


@pytest.mark.parametrize("row,pointer,message", [
    (sharegpt(("gpt", "hi"), ("human", "yo")), "/conversations/0/from", "turn 1 has role 'gpt'"),
    (sharegpt(("human", "hi"), ("gpt", "a"), ("human", "b")), "/conversations/2/from", "must end with an assistant"),
    (sharegpt(("human", "hi"), ("bot", "yo")), "/conversations/1/from", "unknown role 'bot'"),
    (sharegpt(("human", "hi"), ("gpt", "   ")), "/conversations/1/value", "empty final answer"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "/conversations/1", "missing 'value'"),
    ({"conversations": "hi"}, "/conversations", "not of type"),
    ({"other": 1}, "", "missing column 'conversations'"),
    (sharegpt(("human", "hi"), ("gpt", "yo"), tools="[{"), "/tools", "tools must be JSON"),
    (sharegpt(("human", "hi"), ("function_call", "call it")), "/conversations/1/value", "function call must be JSON"),
    ([1, 2], "", "must be a JSON object"),
])
def test_bad_sharegpt_rows(tmp_path, row, pointer, message):
    text, errors = bad_row_report(tmp_path, [GOOD, row])
    assert len(errors) == 1
    (error,) = errors
    assert (error["row"], error["line"], error["pointer"]) == (1, 2, pointer)
    assert message in error["message"]
    assert f"bad.jsonl:row 1 (line 2): {pointer or '/'}: " in text  # the CLI message names file:row and pointer


def test_bad_preference_rows(tmp_path):
    entry = {"file_name": "p.jsonl", "formatting": "sharegpt", "ranking": True,
             "columns": {"chosen": "chosen", "rejected": "rejected"}}
    same = {**sharegpt(("human", "q")), "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "a"}}
    ends_with_answer = {**sharegpt(("human", "q"), ("gpt", "a")), "chosen": {"from": "gpt", "value": "a"},
                        "rejected": {"from": "gpt", "value": "b"}}
    _, errors = bad_row_report(tmp_path, [same, ends_with_answer], entry, "dpo", "p.jsonl")
    assert [(e["row"], e["pointer"]) for e in errors] == [(0, "/rejected/value"), (1, "/conversations")]
    assert "chosen and rejected are the same" in errors[0]["message"]


def test_bad_alpaca_and_kto_rows(tmp_path):
    entry = {"file_name": "k.jsonl", "columns": {"kto_tag": "label"}}
    rows = [{"instruction": "q", "output": "a", "label": True}, {"instruction": "q", "output": "a", "label": "yes"},
            {"instruction": "", "input": "", "output": "a", "label": False}, {"instruction": "q", "output": ""}]
    _, errors = bad_row_report(tmp_path, rows, entry, "kto", "k.jsonl")
    assert [(e["row"], e["pointer"]) for e in errors] == [(1, "/label"), (2, "/instruction"), (3, "/output")]
    assert "empty instruction" in errors[1]["message"]
    assert any(o["pointer"] == "" and "'label'" in o["message"] for o in errors[2]["other_errors"])


def test_malformed_json_array_reports_line_and_column(tmp_path):
    folder = write_info(tmp_path / "d", {"x": {"file_name": "x.json"}},
                        {"x.json": '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": oops}\n]'})
    with pytest.raises(TunepipeError, match=r"x.json: invalid JSON at line 3 column 19"):
        validate(tmp_path, folder, "x")


def test_non_utf8_file_reports_the_byte_offset(tmp_path):
    folder = write_info(tmp_path / "d", {"x": {"file_name": "x.jsonl"}})
    (folder / "x.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(TunepipeError, match=r"not UTF-8: byte 0xe9 at byte offset 56 \(line 2\)"):
        validate(tmp_path, folder, "x")


def test_empty_dataset_missing_file_and_missing_column_are_single_errors(tmp_path):
    folder = write_info(tmp_path / "d", {"empty": {"file_name": "e.json"}, "gone": {"file_name": "g.json"},
                                         "nocol": {"file_name": "n.json", "columns": {"response": "answer"}}},
                        {"e.json": "[]", "n.json": json.dumps([{"instruction": "q", "output": "a"}] * 3)})
    with pytest.raises(TunepipeError, match=r"'empty'.*holds no rows"):
        validate(tmp_path, folder, "empty")
    with pytest.raises(TunepipeError, match=r"'gone'.*g.json not found"):
        validate(tmp_path, folder, "gone")
    with pytest.raises(TunepipeError, match=r"column 'answer' \(response\) is missing from every row; "
                                            r"columns found: instruction, output"):
        validate(tmp_path, folder, "nocol")


def test_stage_must_match_the_dataset_kind(tmp_path, lf_demo_dir):
    with pytest.raises(TunepipeError, match=r"'dpo_en_demo' holds preference rows but train.stage=sft"):
        validate(tmp_path, lf_demo_dir, "dpo_en_demo", "sft")
    with pytest.raises(TunepipeError, match=r"holds sft rows but train.stage=kto needs kto rows"):
        validate(tmp_path, lf_demo_dir, "identity", "kto")


def test_drop_keeps_every_rejected_row_unchanged(tmp_path):
    good = [GOOD] * 3
    bad = [sharegpt(("gpt", "x"), ("human", "y")), {"conversations": [{"from": "human"}]}]
    lines = jsonl(good[0], bad[0], good[1], bad[1], good[2]) + "{not json\n"
    folder = write_info(tmp_path / "d", {"mix": {"file_name": "m.jsonl", "formatting": "sharegpt"}},
                        {"m.jsonl": lines})
    report = validate(tmp_path, folder, "mix", on_invalid="drop")
    assert (report["valid"], report["invalid"]) == (3, 3)
    rejected = [json.loads(line) for line in (tmp_path / "out/reports/rejected.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejected] == [1, 3, 5] and [r["line"] for r in rejected] == [2, 4, 6]
    assert [r["data"] for r in rejected[:2]] == bad and rejected[2]["raw_text"] == "{not json"
    assert all(r["dataset"] == "mix" and r["message"] for r in rejected)
    (item,) = read_manifest(tmp_path / "out/data/validated")["train"]
    assert item["rows"] == 3


def test_report_keeps_100_errors_in_full_and_counts_the_rest(tmp_path):
    rows = [sharegpt(("gpt", "x"), ("human", "y"))] * 130 + [GOOD]
    folder = write_info(tmp_path / "d", {"many": {"file_name": "m.jsonl", "formatting": "sharegpt"}},
                        {"m.jsonl": jsonl(*rows)})
    validate(tmp_path, folder, "many", on_invalid="drop")
    summary = json.loads((tmp_path / "out/reports/validation.json").read_text())["datasets"]["many"]
    assert (summary["rows_read"], summary["valid"], summary["invalid"]) == (131, 1, 130)
    assert len(summary["errors"]) == 100 and summary["errors_not_shown"] == 30
    assert summary["errors"][99] == {"file": str(folder / "m.jsonl"), "row": 99, "line": 100,
                                     "pointer": "/conversations/0/from",
                                     "message": summary["errors"][0]["message"]}


def test_cli_validate_exits_2_and_prints_the_row(tmp_path, capsys):
    folder = write_info(tmp_path / "d", {"bad": {"file_name": "b.jsonl", "formatting": "sharegpt"}},
                        {"b.jsonl": jsonl(GOOD, sharegpt(("human", "x")))})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset: bad\ndataset_dir: {folder}\noutput_dir: {tmp_path / 'run'}\nreport_to: none\n")
    assert cli_main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error: 1 invalid row in bad" in err and "b.jsonl:row 1 (line 2): /conversations/0/from" in err
    assert not (tmp_path / "run" / "data" / "validated").exists()  # nothing partial is written


def test_eval_datasets_are_listed_separately(tmp_path, lf_demo_dir):
    validate(tmp_path, lf_demo_dir, "alpaca_en_demo", eval_dataset="identity")
    manifest = read_manifest(Layout.at(tmp_path / "out").validated)
    assert [i["name"] for i in manifest["train"]] == ["alpaca_en_demo"]
    assert [i["name"] for i in manifest["eval"]] == ["identity"] and manifest["stage"] == "sft"


def test_validated_rows_are_identical_on_rerun(tmp_path, lf_demo_dir):
    validate(tmp_path / "a", lf_demo_dir, "identity,glaive_toolcall_en_demo")
    validate(tmp_path / "b", lf_demo_dir, "identity,glaive_toolcall_en_demo")
    for name in ("identity.jsonl", "glaive_toolcall_en_demo.jsonl", "manifest.json"):
        first = (tmp_path / "a/out/data/validated" / name).read_bytes()
        assert first == (tmp_path / "b/out/data/validated" / name).read_bytes()
    assert Path(tmp_path / "a/out/reports/rejected.jsonl").read_text() == ""


def test_openai_preference_rows_need_both_answers(tmp_path):
    entry = {"file_name": "o.jsonl", "formatting": "openai", "ranking": True,
             "columns": {"chosen": "chosen", "rejected": "rejected"}}
    good = {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "a"},
            "rejected": {"role": "assistant", "content": "b"}}
    no_rejected = {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "a"}}
    _, errors = bad_row_report(tmp_path, [good, no_rejected], entry, "dpo", "o.jsonl")
    assert [(e["row"], e["pointer"], e["message"]) for e in errors] == [(1, "", "missing column 'rejected' (rejected)")]


def test_readers_stream_rows_equal_to_whole_file_parsing(tmp_path):
    from tunepipe.data.sources.readers import read_rows

    rows = [{"instruction": f"q{i} \u00e9\u4e2d\U0001F600", "output": "a\u2028b", "score": i / 3, "n": i}
            for i in range(2500)]
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for name, kind in (("a.json", "json"), ("a.jsonl", "jsonl")):
        raw = list(read_rows(tmp_path / name, kind, name))
        assert [r.data for r in raw] == rows and [r.index for r in raw] == list(range(len(rows)))
    assert [r.line for r in read_rows(tmp_path / "a.jsonl", "jsonl", "a.jsonl")][:3] == [1, 2, 3]


def test_utf8_check_across_read_blocks(tmp_path):
    from tunepipe.data.sources.readers import check_utf8

    good = ("ab\n" + "\u00e9\U0001F600" * 5 + "\n").encode()
    (tmp_path / "good.txt").write_bytes(good * 3)
    for block in (1, 2, 3, 7):  # every multi-byte character split by some block boundary
        check_utf8(tmp_path / "good.txt", "good.txt", block=block)
    (tmp_path / "bad.txt").write_bytes(good + b"x\xe9y")
    for block in (1, 5, 1 << 20):
        with pytest.raises(TunepipeError, match=rf"byte 0xe9 at byte offset {len(good) + 1} \(line 3\)"):
            check_utf8(tmp_path / "bad.txt", "bad.txt", block=block)
