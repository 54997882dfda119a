"""Videos on a tiny Qwen3-VL: the frame size comes from the whole clip (transformers' Qwen3-VL resize),
the pixels equal transformers' own Qwen3VLVideoProcessor, each temporal patch is written as
"<t seconds>" + start + its tokens + end in LLaMA-Factory 0.9.5's qwen3_vl rendering (equal to
LLaMA-Factory's own rows on mllm_video_demo), and a batch of video rows gives each sample its
loss alone (Qwen3-VL's per-frame 3-D positions included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from PIL import Image

from tests.fixtures.tiny_vlm_families import build_qwen3_vl
from tests.fixtures.video_processor import video_processor_class
from tests.fixtures.vlm_checks import assert_each_row_as_alone
from tests.test_tokenize import run_stages
from tunepipe.data.tokenizing.encoding import IGNORE
from tunepipe.data.video import QWEN3_VL_VIDEO_DEFAULTS, Clip, VideoBudget, VideoProcessing, sample_indices
from tunepipe.data.vision import MediaTokens, regularized_size
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.train.model.vision import VisionCollator

av = pytest.importorskip("av")

VIDEO = {"video_maxlen": 4, "video_max_pixels": 64 * 64, "cutoff_len": 2048}


@pytest.fixture(scope="module")
def qwen3vl_dir(tmp_path_factory) -> Path:
    return build_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3vl-video"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, qwen3vl_dir, lf_demo_dir):
    cfg, layout, _ = run_stages(tmp_path_factory.mktemp("qwen3vl-video"), qwen3vl_dir, lf_demo_dir,
                                "mllm_video_demo", template="qwen3_vl", **VIDEO)
    return cfg, load_from_disk(str(layout.tokenized / "train"))


def test_pixels_equal_the_transformers_qwen3_vl_video_processor(qwen3vl_dir, monkeypatch):
    from transformers import AutoImageProcessor

    reference = video_processor_class(monkeypatch, "qwen3_vl", "Qwen3VLVideoProcessor").from_pretrained(qwen3vl_dir)
    ours = VideoProcessing.load(qwen3vl_dir, AutoImageProcessor.from_pretrained(qwen3vl_dir, backend="pil"),
                                QWEN3_VL_VIDEO_DEFAULTS, temporal_resize=True)
    assert ours.settings["size"] == dict(reference.size) and ours.settings["patch_size"] == reference.patch_size == 16
    assert ours.settings["image_mean"] == list(reference.image_mean)
    rng = np.random.default_rng(0)
    for count, (width, height) in ((5, (96, 64)), (4, (64, 128))):  # sizes the 3-D resize keeps; 5: padded
        frames = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]
        expected = reference(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
        got = ours.pixels([Clip(frames, 2.0)])
        assert got["video_grid_thw"].tolist() == expected["video_grid_thw"].tolist()
        torch.testing.assert_close(got["pixel_values_videos"], expected["pixel_values_videos"], atol=1e-6, rtol=0)
    # the pixel bound covers the whole clip: more frames, smaller frames, counted as transformers counts them
    for count in (2, 8, 16):
        assert ours.tokens(count, 320, 256) == reference.get_num_of_video_patches(count, 256, 320, {}) // 4
    assert ours.frame_size(16, 320, 256) < ours.frame_size(2, 320, 256) == (320, 256)


def lf_video_text(path, processor_size: dict, budget: VideoBudget) -> str:
    """LLaMA-Factory 0.9.5's qwen3_vl text for one video, from the stream header alone (its Qwen3VLPlugin
    metadata path): frames rounded up to even, the frame size regularized, then transformers' Qwen3-VL
    smart_resize over the frames; timestamps from the sampled indices by transformers' own Qwen3VLProcessor."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        indices = sample_indices(stream.frames, float(stream.duration * stream.time_base), budget)
        rate = float(stream.average_rate)
        width, height = regularized_size(stream.width, stream.height, budget.max_pixels, budget.min_pixels, 28)
    frames = len(indices) + len(indices) % 2
    h, w = smart_resize(frames, height, width, 2, 32, processor_size["shortest_edge"], processor_size["longest_edge"])
    per_patch = (h // 16) * (w // 16) // 4
    seconds = Qwen3VLProcessor._calculate_timestamps(None, [k / rate * budget.fps for k in indices], budget.fps, 2)
    return "".join(f"<{t:.1f} seconds><|vision_start|>{'<|video_pad|>' * per_patch}<|vision_end|>"
                   for t in seconds[:frames // 2])


def test_video_rows_write_each_temporal_patch_with_its_timestamp(shards, qwen3vl_dir, lf_demo_dir):
    cfg, rows = shards
    tokenizer = load_tokenizer(qwen3vl_dir)
    pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    size = json.loads((qwen3vl_dir / "preprocessor_config.json").read_text())["size"]
    budget = VideoBudget.from_data(cfg.data)
    raw = json.loads((lf_demo_dir / "mllm_video_demo.json").read_text())
    assert len(rows) == len(raw) and rows.column_names == ["input_ids", "labels", "media"]  # never pixels
    for row, source in zip(rows, raw):
        (user, answer), (video,) = source["messages"], source["videos"]
        video_text = lf_video_text(lf_demo_dir / video, size, budget)
        assert video_text.count("seconds>") == 2  # 4 frames: two temporal patches, each with its time
        user_ids = tokenizer(user["content"].replace("<video>", video_text), add_special_tokens=False)["input_ids"]
        ids = row["input_ids"]
        start = next(k for k in range(len(ids)) if ids[k:k + len(user_ids)] == user_ids)  # the user turn, as one
        assert row["input_ids"].count(pad) == video_text.count("<|video_pad|>") > 0
        assert all(label == IGNORE for label in row["labels"][:start + len(user_ids)])  # media and prompt untrained
        answer_ids = tokenizer(answer["content"], add_special_tokens=False)["input_ids"]
        trained = [label for label in row["labels"] if label != IGNORE]
        assert any(trained[k:k + len(answer_ids)] == answer_ids for k in range(len(trained)))
    first = lf_video_text(lf_demo_dir / raw[0]["videos"][0], size, budget)
    # 1.mp4 (25 fps): frames 0, 80, 161, 242 at 0, 3.2, 6.44, 9.68 s; each patch at the mean of its two
    assert first.startswith("<1.6 seconds>") and first.count("<8.1 seconds>") == 1


def test_video_rows_equal_llamafactory_golden_rows(shards):
    """LLaMA-Factory 0.9.5's own ids and labels for these rows (bench/video_parity.py --template qwen3_vl
    --write-fixture: its get_dataset with the tiny model's processor built by transformers, torchvision
    included)."""
    golden = json.loads((Path(__file__).parent / "fixtures" / "video_parity" / "qwen3_vl_mllm_video_demo.json")
                        .read_text())
    assert golden["keys"] == VIDEO and golden["template"] == "qwen3_vl"
    _, rows = shards
    assert rows["input_ids"] == golden["input_ids"] and rows["labels"] == golden["labels"]


def test_a_batch_of_qwen3_vl_video_rows_gives_each_sample_its_loss_alone(shards, qwen3vl_dir):
    cfg, rows = shards
    tokenizer = load_tokenizer(qwen3vl_dir)
    collator = VisionCollator(tokenizer.pad_token_id, MediaTokens.for_data(qwen3vl_dir, tokenizer, cfg.data))
    model = load_causal_lm(qwen3vl_dir).eval()
    batch_rows = [rows[1], rows[0], rows[2]]  # different lengths: padded
    batch = collator(batch_rows)
    types = batch["mm_token_type_ids"]
    assert batch["video_grid_thw"][:, 0].tolist() == [2, 2, 2]
    assert int((types == 2).sum()) == int((batch["input_ids"] == collator.media.video_token_id).sum())
    assert_each_row_as_alone(model, collator, batch_rows)
    # Qwen3-VL places each temporal patch as its own frame (its timestamp text between them): the
    # video tokens are 3-D, each patch's tokens share one temporal index, and the two patches differ
    position_ids, _ = model.model.get_rope_index(batch["input_ids"][:1], types[:1], None,
                                                 batch["video_grid_thw"][:1], batch["attention_mask"][:1])
    video = position_ids[:, 0, types[0] == 2]
    per_patch = video.shape[1] // 2
    assert len(set(map(tuple, video.T.tolist()))) == video.shape[1]
    assert len(set(video[0, :per_patch].tolist())) == 1 and video[0, per_patch] > video[0, per_patch - 1]


def test_each_video_of_a_row_gets_its_own_patches_and_times(shards, qwen3vl_dir, tmp_path):
    """Two videos in one row (LLaMA-Factory 0.9.5 would give both the first video's patch count and the
    first message's times: docs/migrating-from-llama-factory.md); tunepipe writes each its own."""
    from tests.test_vlm_video import write_clip
    from tunepipe.data.sources.media import file_sha256

    cfg, _ = shards
    media = MediaTokens.for_data(qwen3vl_dir, load_tokenizer(qwen3vl_dir), cfg.data)
    media.media_dir = tmp_path
    refs = [{"path": name, "sha256": file_sha256(write_clip(tmp_path / name, frames=frames, rate=5))}
            for name, frames in (("long.mp4", 20), ("short.mp4", 3))]  # 4 s: 4 frames (2 patches); 0.6 s: 1 (1)
    marker = media.video_marker()
    (turn,) = media.expand_videos([[f"<|im_start|>user\n{marker}first{marker}second<|im_end|>\n"]], refs)
    texts = [element for element in turn if isinstance(element, str)]
    # long: frames 0, 6, 12, 19 at 0, 1.2, 2.4, 3.8 s; short: frame 0, repeated to a whole patch
    assert texts == ["<|im_start|>user\n<0.6 seconds><|vision_start|>", "<|vision_end|><3.1 seconds><|vision_start|>",
                     "<|vision_end|>first<0.0 seconds><|vision_start|>", "<|vision_end|>second<|im_end|>\n"]
    size = regularized_size(64, 48, cfg.data.video_max_pixels, cfg.data.video_min_pixels, 28)
    per_patch = media.video.frame_tokens
    assert turn.count(media.video_token_id) == 2 * per_patch(4, *size) + per_patch(2, *size)
