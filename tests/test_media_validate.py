"""validate with images and videos: LLaMA-Factory's mllm demos pass with every file hashed; each kind
of bad media (missing, undecodable, outside media_dir, placeholder mismatch) is a row-precise error
that leaves no output behind."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.test_validate import config
from tunepipe.data.checks.validated import read_manifest, read_validated
from tunepipe.data.validate import run_validate
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout


def rows_of(out):
    validated = Layout.at(out).validated
    return read_validated(validated, read_manifest(validated)["train"][0])


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,kind", [("mllm_demo", "images"), ("mllm_video_demo", "videos")])
def test_lf_mllm_demos_validate_with_each_file_hashed(tmp_path, lf_demo_dir, name, kind):
    pytest.importorskip("av") if kind == "videos" else None
    report = run_validate(config(lf_demo_dir, name), Layout.at(tmp_path / "out"))
    raw = json.loads((lf_demo_dir / f"{name}.json").read_text())
    assert report["invalid"] == 0 and report["valid"] == len(raw)
    media = report["datasets"][name]["media"]
    assert media[kind] == sum(len(r[kind]) for r in raw) and media["rows_with_placeholders_prepended"] == 0
    for row, source in zip(rows_of(tmp_path / "out"), raw):
        assert [ref["path"] for ref in row[kind]] == source[kind]
        assert [ref["sha256"] for ref in row[kind]] == [sha(lf_demo_dir / p) for p in source[kind]]
        assert [t["content"] for t in row["messages"]] == [m["content"] for m in source["messages"]]


def image_dataset(root, rows, formatting="sharegpt"):
    """A dataset_info.json + rows in `root`, and two real PNGs under root/img."""
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "img" / "red.png")
    Image.new("RGB", (30, 50), (10, 10, 200)).save(root / "img" / "blue.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    columns = {"images": "images", **({"messages": "messages"} if formatting != "alpaca" else {})}
    entry = {"file_name": "rows.json", "formatting": formatting, "columns": columns}
    if formatting == "sharegpt":
        entry["tags"] = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    (root / "dataset_info.json").write_text(json.dumps({"pics": entry}))
    (root / "rows.json").write_text(json.dumps(rows))


def chat(text, images, answer="A red box."):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}],
            "images": images}


def test_alpaca_rows_absolute_paths_and_prepended_placeholders(tmp_path):
    root = tmp_path / "data"
    image_dataset(root, [{"instruction": "<image>What is it?", "output": "Red.", "images": ["img/red.png"]},
                         {"instruction": "Compare them.", "output": "Two.",
                          "images": [str(root / "img" / "red.png"), "img/blue.png"]}], formatting="alpaca")
    report = run_validate(config(root, "pics"), Layout.at(tmp_path / "out"))
    assert report["datasets"]["pics"]["media"]["rows_with_placeholders_prepended"] == 1
    first, second = rows_of(tmp_path / "out")
    assert first["messages"][0]["content"] == "<image>What is it?"
    assert second["messages"][0]["content"] == "<image><image>Compare them."  # as LLaMA-Factory prepends
    assert [r["path"] for r in second["images"]] == ["img/red.png", "img/blue.png"]  # absolute -> relative
    assert second["images"][1]["sha256"] == sha(root / "img" / "blue.png")


def test_openai_rows_with_images(tmp_path):
    root = tmp_path / "data"
    image_dataset(root, [chat("<image>What colour?", ["img/red.png"])], formatting="openai")
    report = run_validate(config(root, "pics"), Layout.at(tmp_path / "out"))
    (row,) = rows_of(tmp_path / "out")
    assert report["valid"] == 1 and row["images"] == [{"path": "img/red.png", "sha256": sha(root / "img" / "red.png")}]
    assert row["messages"][0] == {"role": "user", "content": "<image>What colour?"}


def test_media_dir_moves_where_paths_resolve(tmp_path):
    root, media = tmp_path / "data", tmp_path / "media"
    image_dataset(root, [chat("<image>Colour?", ["red.png"])])
    image_dataset(media, [])  # the same pictures, in another folder
    with pytest.raises(TunepipeError, match=r"rows.json:row 0.*/images/0.*not found"):
        run_validate(config(root, "pics"), Layout.at(tmp_path / "out"))
    report = run_validate(config(root, "pics", media_dir=media / "img"), Layout.at(tmp_path / "out"))
    assert report["valid"] == 1 and rows_of(tmp_path / "out")[0]["images"][0]["path"] == "red.png"


@pytest.mark.parametrize("row,pointer,message", [
    (chat("<image>Hi", ["img/missing.png"]), "/images/0", "not found"),
    (chat("<image>Hi", ["img/broken.png"]), "/images/0", "not a readable image"),
    (chat("<image>Hi", ["../outside.png"]), "/images/0", "outside media_dir"),
    (chat("<image>Hi", ["/etc/hostname"]), "/images/0", "outside media_dir"),
    (chat("<image><image>Hi", ["img/red.png"]), "/messages", "2 <image> placeholders but the row names 1 images"),
    (chat("Hi", [{"bytes": None, "path": "x.png"}]), "/images/0", "'x.png' not found"),  # datasets' path-only image
    (chat("Hi", [{"url": "x.png"}]), "/images/0", "must be an image as {bytes, path}"),
    (chat("Hi", [7]), "/images/0", "must be a file path"),
])
def test_bad_media_is_a_row_precise_error_with_nothing_written(tmp_path, row, pointer, message):
    root = tmp_path / "data"
    (tmp_path / "outside.png").write_bytes((tmp_path.parent / "x").as_posix().encode())
    good = chat("<image>Colour?", ["img/red.png"])
    image_dataset(root, [good, row])
    layout = Layout.at(tmp_path / "out")
    with pytest.raises(TunepipeError) as caught:
        run_validate(config(root, "pics"), layout)
    assert "rows.json:row 1" in str(caught.value) and pointer in str(caught.value) and message in str(caught.value)
    assert not layout.validated.exists()  # nothing half-written
    report = run_validate(config(root, "pics", on_invalid="drop"), layout)
    assert report["valid"] == 1 and report["datasets"]["pics"]["errors"][0]["pointer"] == pointer
    rejected = [json.loads(line) for line in (layout.reports / "rejected.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejected] == [1] and rejected[0]["data"] == row


def test_a_changed_image_changes_the_validated_rows(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    image_dataset(root, [chat("<image>Colour?", ["img/red.png"])])
    run_validate(config(root, "pics"), Layout.at(tmp_path / "a"))
    Image.new("RGB", (40, 30), (201, 10, 10)).save(root / "img" / "red.png")
    run_validate(config(root, "pics"), Layout.at(tmp_path / "b"))
    before, after = rows_of(tmp_path / "a")[0], rows_of(tmp_path / "b")[0]
    assert before["images"][0]["sha256"] != after["images"][0]["sha256"] == sha(root / "img" / "red.png")


def test_audio_columns_are_refused_by_name(tmp_path, lf_demo_dir):
    with pytest.raises(TunepipeError, match=r"mllm_audio_demo.*\['audios'\] are not supported") as caught:
        run_validate(config(lf_demo_dir, "mllm_audio_demo"), Layout.at(tmp_path / "out"))
    assert "images and videos" in caught.value.hint
