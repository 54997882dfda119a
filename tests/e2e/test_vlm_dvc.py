"""The whole pipeline on a tiny Qwen2-VL through `dvc repro`, in a throw-away copy of the repo, on
LLaMA-Factory's own mllm_demo and mllm_video_demo (issue 21, "Done when", first bullet; the
`tunepipe train` path is tests/e2e/test_vlm_cli.py).

One `dvc repro` runs base_model -> validate -> tokenize -> train -> evaluate -> merge. Then: the
shards hold media references (never pixels); train and eval metrics are finite; the export reloads
with plain `AutoModelForImageTextToText` and its logits on a prompt with one of mllm_demo's images
equal base + adapter (PEFT) within 1e-4; `tunepipe chat --image` (the CLI's entry point) answers what
greedy decoding by hand gives; and changing one image's bytes puts validate and everything after it
out of date (the images live under data/raw, validate's dependency, as the README asks; the
sha256 in the validated rows carries the change on to tokenize).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import sys

import pytest
import torch
import yaml
from tests.e2e.cli_runs import run_here
from tests.e2e.test_data_stages import REPO, dvc
from tests.test_vlm_use import greedy_by_hand, picture_prompt

from tunepipe.data.vision import MediaTokens
from tunepipe.models.base import load_causal_lm, load_tokenizer

MAX_PIXELS, MIN_PIXELS = 112 * 112, 32 * 32
PICTURE = "mllm_demo_data/1.jpg"
QUESTION = "Who are they?"
DATASETS = ("mllm_demo", "mllm_video_demo")


def vlm_repo_copy(root, lf_demo_dir, model_dir):
    """The project's stages and params in `root`, the demo sets and their media under data/raw."""
    for name in ("dvc.yaml", "params.yaml", "stages", "src", "schemas", "configs"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, root / name)
    raw = root / "data" / "raw"
    # the demo's media copied (not linked): the test changes one image's bytes
    shutil.copytree(lf_demo_dir / "mllm_demo_data", raw / "mllm_demo_data")
    info = json.loads((lf_demo_dir / "dataset_info.json").read_text())
    entries = {}
    for name in DATASETS:
        shutil.copy2(lf_demo_dir / info[name]["file_name"], raw / info[name]["file_name"])
        entries[name] = {**info[name], "file_name": f"raw/{info[name]['file_name']}"}
    (root / "data" / "dataset_info.json").write_text(json.dumps(entries))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["model_name_or_path"] = str(model_dir)
    params["data"].update({"dataset": ",".join(DATASETS), "eval_dataset": None, "val_size": 2,
                           "template": "qwen2_vl", "cutoff_len": 1024, "media_dir": "data/raw",
                           "image_max_pixels": MAX_PIXELS, "image_min_pixels": MIN_PIXELS,
                           "video_max_pixels": 64 * 64, "video_maxlen": 4})
    params["train"].update({"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1,
                            "save_steps": 1000, "lora_rank": 4, "learning_rate": 5.0e-2})
    params["eval"].update({"max_new_tokens": 4, "max_predict_samples": 2, "compare_base": False})
    params["tracking"]["report_to"] = "none"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def vlm_repo(tmp_path_factory, lf_demo_dir, tiny_qwen2vl_dir):
    repo = vlm_repo_copy(tmp_path_factory.mktemp("vlm-repo"), lf_demo_dir, tiny_qwen2vl_dir)
    dvc(repo, "init", "-q", "--no-scm")
    done = dvc(repo, "repro", "evaluate", "merge")
    for stage in ("base_model", "validate", "tokenize", "train", "evaluate", "merge"):
        assert f"Running stage '{stage}'" in done.stdout, done.stdout
    return repo


@pytest.mark.slow
def test_dvc_repro_trains_evaluates_and_exports_a_vlm_on_the_demo_sets(vlm_repo, tiny_qwen2vl_dir, monkeypatch,
                                                                       capsys):
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from tunepipe.models.trained import apply_adapters

    report = json.loads((vlm_repo / "reports" / "validation.json").read_text())
    assert report["invalid"] == 0
    assert report["datasets"]["mllm_video_demo"]["media"]["videos"] == 3
    shards = load_from_disk(str(vlm_repo / "data" / "tokenized" / "train"))
    refs = [json.loads(row) for row in shards["media"]]
    images = {ref["path"] for row in refs for ref in row.get("images", [])}
    videos = {ref["path"] for row in refs for ref in row.get("videos", [])}
    assert images and images <= {f"mllm_demo_data/{k}.jpg" for k in (1, 2, 3)}
    assert videos and all(ref.startswith("mllm_demo_data/") for ref in videos)
    assert not any("pixel" in column for column in shards.column_names)  # references, never pixels
    rows = sum(len(json.loads((vlm_repo / "data" / "raw" / f"{name}.json").read_text())) for name in DATASETS)
    assert len(shards) + len(load_from_disk(str(vlm_repo / "data" / "tokenized" / "eval"))) == rows

    train = json.loads((vlm_repo / "metrics" / "train.json").read_text())
    assert math.isfinite(train["train_loss"]) and train.get("global_step", 2) == 2
    evaluated = json.loads((vlm_repo / "metrics" / "eval.json").read_text())
    tuned_metrics = evaluated.get("tuned", evaluated)
    assert math.isfinite(tuned_metrics["eval_loss"]) and tuned_metrics["eval_tokens"] > 0
    predictions = (vlm_repo / "reports" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 2

    export = vlm_repo / "models" / "export"
    assert json.loads((vlm_repo / "metrics" / "export.json").read_text())["probe_images"] > 0
    tokenizer = load_tokenizer(export)
    media = MediaTokens.load(export, tokenizer, vlm_repo / "data" / "raw", MAX_PIXELS, MIN_PIXELS)
    ids, media_json = picture_prompt(tokenizer, media, QUESTION, [PICTURE])
    row = torch.tensor([ids])
    inputs = {"input_ids": row, **media.model_inputs(row, [media_json])}
    merged = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    tuned = apply_adapters(load_causal_lm(tiny_qwen2vl_dir), [vlm_repo / "models" / "adapter"]).eval()
    assert isinstance(tuned, PeftModel)
    with torch.no_grad():
        assert int(inputs["mm_token_type_ids"].sum()) > 0
        torch.testing.assert_close(merged(**inputs).logits, tuned(**inputs).logits, atol=1e-4, rtol=0)
        base = load_causal_lm(tiny_qwen2vl_dir).eval()
        assert (base(**inputs).logits - tuned(**inputs).logits).abs().max() > 1e-4  # the training mattered

    # `tunepipe chat --image` on the exported model through the CLI's entry point (in this process:
    # a child would spend ~10 s of CPU importing torch again): the answer is greedy decoding by hand
    monkeypatch.chdir(vlm_repo)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n/exit\n"))
    assert run_here("chat", "params.yaml", f"model.model_name_or_path={export}",
                    "--image", str(vlm_repo / "data" / "raw" / PICTURE)) == 0
    out = capsys.readouterr().out
    answer = next(line for line in out.splitlines() if line.startswith("Assistant: "))[len("Assistant: "):].strip()
    by_hand = greedy_by_hand(merged, media, ids, media_json, 4, tokenizer.eos_token_id)
    assert by_hand and answer == tokenizer.decode(by_hand, skip_special_tokens=True).strip()


def stale_stages(repo) -> dict:
    """`dvc status` of evaluate and merge and every stage they depend on: {stage: what changed}."""
    return json.loads(dvc(repo, "status", "--json", "--with-deps", "evaluate", "merge").stdout or "{}")


@pytest.mark.slow
def test_a_changed_image_reruns_validate_and_everything_after_it(vlm_repo):
    from tunepipe.data.sources.media import file_sha256

    assert stale_stages(vlm_repo) == {}  # one `dvc repro` left the whole pipeline up to date
    picture = vlm_repo / "data" / "raw" / PICTURE
    original = picture.read_bytes()
    try:
        picture.write_bytes(original + b"\0")  # the same picture to Pillow, other bytes: another sha256
        assert stale_stages(vlm_repo) == {"validate": [{"changed deps": {"data/raw": "modified"}}]}
        dvc(vlm_repo, "repro", "validate")
        validated = (vlm_repo / "data" / "validated" / "mllm_demo.jsonl").read_text()
        assert file_sha256(picture) in validated and hashlib.sha256(original).hexdigest() not in validated
        # the validated rows changed with the image's bytes, so tokenize (and so train, evaluate, merge) re-run
        assert stale_stages(vlm_repo) == {"tokenize": [{"changed deps": {"data/validated": "modified"}}]}
    finally:
        picture.write_bytes(original)
