"""DPO with images on a tiny Qwen2-VL, from preference rows in LLaMA-Factory's RLHF-V layout (sharegpt,
`ranking: true`, conversations + chosen + rejected + images): both answers carry the prompt's image
tokens and see its pixels, image tokens are never trained, and the DPO loss of a fixed two-row batch
with images equals the formula on each sequence's log-probs computed alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import load_from_disk
from PIL import Image

from tests.fixtures.hub import write_image_parquet
from tests.test_tokenize import run_stages
from tunepipe.config.loader import load_config
from tunepipe.data.vision import MediaTokens
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.train.model.model_setup import apply_finetuning
from tunepipe.train.model.vision import VisionCollator
from tunepipe.train.preference.common import build_reference
from tunepipe.train.preference.data import PreferenceCollator
from tunepipe.train.preference.dpo import dpo_objective

MAX_PIXELS, MIN_PIXELS = 112 * 112, 32 * 32
RLHF_V_ENTRY = {"file_name": "rlhf_v_local.json", "ranking": True, "formatting": "sharegpt",
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                            "images": "images"}}


def write_preference_images(root):
    """Three generated pictures and four RLHF-V-style rows (one with two images, one without a
    placeholder: validate prepends it, as LLaMA-Factory does)."""
    (root / "pics").mkdir(parents=True)
    for name, size, colour in (("red.png", (56, 84), (200, 30, 30)), ("blue.png", (84, 56), (20, 40, 220)),
                               ("grey.jpg", (70, 70), (128, 128, 128))):
        Image.new("RGB", size, colour).save(root / "pics" / name)
    rows = [
        {"conversations": [{"from": "human", "value": "<image>What colour is this?"}],
         "chosen": {"from": "gpt", "value": "It is red."}, "rejected": {"from": "gpt", "value": "It is green."},
         "images": ["pics/red.png"]},
        {"conversations": [{"from": "human", "value": "Compare <image> and <image>."}],
         "chosen": {"from": "gpt", "value": "Blue, then grey."}, "rejected": {"from": "gpt", "value": "Both red."},
         "images": ["pics/blue.png", "pics/grey.jpg"]},
        {"conversations": [{"from": "human", "value": "Describe the picture."}],
         "chosen": {"from": "gpt", "value": "A grey square."}, "rejected": {"from": "gpt", "value": "A dog."},
         "images": ["pics/grey.jpg"]},
        {"conversations": [{"from": "human", "value": "<image>Is it blue?"}],
         "chosen": {"from": "gpt", "value": "Yes."}, "rejected": {"from": "gpt", "value": "No, it is a cat."},
         "images": ["pics/blue.png"]},
    ]
    (root / "rlhf_v_local.json").write_text(json.dumps(rows), encoding="utf-8")
    (root / "dataset_info.json").write_text(json.dumps({"rlhf_v_local": RLHF_V_ENTRY}), encoding="utf-8")
    return rows


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-pref-data")
    write_preference_images(root)
    return root


@pytest.fixture(scope="module")
def pref_shards(tmp_path_factory, tiny_qwen2vl_dir, pref_dir):
    root = tmp_path_factory.mktemp("vlm-dpo")
    layout = run_stages(root, tiny_qwen2vl_dir, pref_dir, "rlhf_v_local", stage="dpo", template="qwen2_vl",
                        image_max_pixels=MAX_PIXELS, image_min_pixels=MIN_PIXELS, cutoff_len=1024)[1]
    return load_from_disk(str(layout.tokenized / "train"))


@pytest.fixture(scope="module")
def media(tiny_qwen2vl_dir, pref_dir):
    return MediaTokens.load(tiny_qwen2vl_dir, load_tokenizer(tiny_qwen2vl_dir), pref_dir, MAX_PIXELS, MIN_PIXELS)


def test_preference_rows_keep_their_images_for_both_answers(pref_shards, media):
    assert len(pref_shards) == 4
    for row in pref_shards:
        images = json.loads(row["media"])["images"]
        expected = sum(media.image_tokens(ref) for ref in images)
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            image_positions = [i for i, token in enumerate(ids) if token == media.image_token_id]
            assert len(image_positions) == expected > 0, side
            assert all(labels[i] == -100 for i in image_positions)  # an image is never a target
        prompt = next(i for i, label in enumerate(row["chosen_labels"]) if label != -100)
        assert row["chosen_input_ids"][:prompt] == row["rejected_input_ids"][:prompt]


def sequence_logp(model, row_ids, row_labels, media_json, collator: VisionCollator) -> torch.Tensor:
    """One sequence alone through the SFT image collator: the summed log-prob of its labelled tokens."""
    batch = collator([{"input_ids": row_ids, "labels": row_labels, "media": media_json}])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    logits = model(**inputs).logits[0, :-1].float()
    targets = batch["labels"][0, 1:]
    keep = targets != -100
    return torch.log_softmax(logits[keep], -1).gather(-1, targets[keep].unsqueeze(-1)).sum()


def test_dpo_loss_with_images_equals_the_formula(pref_shards, media, tiny_qwen2vl_dir):
    train = load_config(None, ["train.stage=dpo", "train.finetuning_type=lora", "train.pref_beta=0.3"]).train
    torch.manual_seed(0)
    model = apply_finetuning(load_causal_lm(tiny_qwen2vl_dir), train)
    with torch.no_grad():  # a policy away from its reference: random LoRA B matrices
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.eval()
    rows = [pref_shards[0], pref_shards[1]]  # one image, then two: the rejected rows need theirs too
    pad = load_tokenizer(tiny_qwen2vl_dir).pad_token_id
    batch = PreferenceCollator(pad, media)(rows)
    images = sum(len(json.loads(row["media"])["images"]) for row in rows)
    assert batch["image_grid_thw"].shape[0] == 2 * images  # chosen rows' images, then the rejected rows'
    with torch.no_grad():
        loss, metrics = dpo_objective(train, build_reference(model, train))(model, batch)
        alone = VisionCollator(pad, media)
        margins = []
        for row in rows:
            policy, reference = {}, {}
            for side in ("chosen", "rejected"):
                args = (row[f"{side}_input_ids"], row[f"{side}_labels"], row["media"], alone)
                policy[side] = sequence_logp(model, *args)
                with model.disable_adapter():
                    reference[side] = sequence_logp(model, *args)
            margins.append((policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"]))
        expected = -F.logsigmoid(train.pref_beta * torch.stack(margins)).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    assert abs(metrics["rewards/margins"][0] / 2 - train.pref_beta * float(torch.stack(margins).mean())) < 1e-4


def test_images_held_in_a_parquet_dataset_are_stored_by_hash_and_train_dpo(tmp_path, tiny_qwen2vl_dir, pref_dir):
    """validate writes each held image once into data/validated/media/<sha256>.<ext>, tokenize carries the
    store beside the shards, and `tunepipe train` (DPO, LoRA) then evaluate read the pictures from there."""
    import hashlib

    import yaml

    from tests.e2e.cli_runs import run_here
    from tunepipe.evaluate.run import run_evaluate
    from tunepipe.layout import Layout

    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    for picture in (pref_dir / "pics").iterdir():
        (data / "pics" / picture.name).write_bytes(picture.read_bytes())
    rows = json.loads((pref_dir / "rlhf_v_local.json").read_text())
    write_image_parquet(data / "rlhf_v_held.parquet", [  # the pictures' bytes in the rows, as hub datasets hold them
        {**row, "images": [{"bytes": (data / path).read_bytes(), "path": path} for path in row["images"]]}
        for row in rows])
    for picture in (data / "pics").iterdir():
        picture.unlink()  # the parquet file alone holds the pictures now
    entry = {**RLHF_V_ENTRY, "file_name": "rlhf_v_held.parquet"}
    (data / "dataset_info.json").write_text(json.dumps({"rlhf_v_held": entry}), encoding="utf-8")
    out = tmp_path / "run"
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_qwen2vl_dir), "stage": "dpo", "finetuning_type": "lora", "lora_target": "all",
        "pref_beta": 0.1, "pref_loss": "sigmoid", "dataset": "rlhf_v_held", "dataset_dir": str(data),
        "template": "qwen2_vl", "cutoff_len": 1024, "image_max_pixels": MAX_PIXELS, "image_min_pixels": MIN_PIXELS,
        "val_size": 1, "output_dir": str(out), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "max_steps": 1, "learning_rate": 1.0e-3, "logging_steps": 1, "report_to": "none",
        "predict_with_generate": False}), encoding="utf-8")  # generation with pictures: tests/test_vlm_use.py
    assert run_here("train", str(cfg)) == 0

    validated = [json.loads(line) for line in (out / "data" / "validated" / "rlhf_v_held.jsonl").read_text().splitlines()]
    refs = [ref for row in validated for ref in row["images"]]
    assert len(refs) == sum(len(row["images"]) for row in rows) and all(ref["stored"] for ref in refs)
    store = out / "data" / "validated" / "media"
    assert sorted(p.name for p in store.iterdir()) == sorted({ref["path"] for ref in refs})  # each picture once
    for ref in refs:
        assert hashlib.sha256((store / ref["path"]).read_bytes()).hexdigest() == ref["sha256"]
        assert ref["path"] == ref["sha256"] + (".jpeg" if ref["path"].endswith(".jpeg") else ".png")
    assert sorted(p.name for p in (out / "data" / "tokenized" / "media").iterdir()) == sorted(p.name for p in store.iterdir())
    metrics = json.loads((out / "metrics" / "train.json").read_text())
    assert "rewards/margins" in metrics and metrics["train_loss"] > 0

    report = run_evaluate(load_config(cfg, []), Layout.at(out))
    assert report["tuned"]["eval_tokens"] > 0 and "rewards/accuracies" in report["preference"]


def test_cached_reference_log_probs_are_keyed_on_the_images(pref_shards, tiny_qwen2vl_dir):
    """precompute_ref_log_probs: a picture whose bytes changed (same size, so the same token ids) must not
    reuse the cached reference log-probs; the DPO trainer keys the cache on the media column too."""
    from tunepipe.train.preference.data import PREFERENCE_COLUMNS
    from tunepipe.train.preference.dpo import reference_columns
    from tunepipe.train.preference.ref_cache import cache_key

    cfg = load_config(None, ["train.stage=dpo"])
    repainted = pref_shards.remove_columns("media").add_column(
        "media", [media.replace('"sha256": "', '"sha256": "0') for media in pref_shards["media"]])
    columns = reference_columns(pref_shards)
    assert cache_key(tiny_qwen2vl_dir, pref_shards, PREFERENCE_COLUMNS, cfg) == \
        cache_key(tiny_qwen2vl_dir, repainted, PREFERENCE_COLUMNS, cfg)  # the ids alone cannot tell
    assert cache_key(tiny_qwen2vl_dir, pref_shards, columns, cfg) != cache_key(tiny_qwen2vl_dir, repainted, columns, cfg)
