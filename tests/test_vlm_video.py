"""Videos on a tiny Qwen2-VL: frames sampled by LLaMA-Factory's rule (PyAV), the pixels equal
transformers' own Qwen2-VL video processor, `<video>` becomes the processor's count of video tokens
(never trained) in LLaMA-Factory's qwen2_vl rendering, the shards keep path + sha256, and a batch of
video (and image) rows gives each sample its loss alone (3-D rotary positions for video included)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from PIL import Image

from tests.fixtures.video_processor import qwen2vl_video_processor_class
from tests.fixtures.vlm_checks import assert_each_row_as_alone
from tests.test_tokenize import run_stages
from tunepipe.data.tokenizing.encoding import IGNORE
from tunepipe.data.video import (
    QWEN2_VL_VIDEO_DEFAULTS,
    Clip,
    VideoBudget,
    VideoProcessing,
    read_clip,
    sample_indices,
)
from tunepipe.data.vision import MediaTokens, regularized_size
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.train.batches.collate import model_inputs
from tunepipe.train.model.vision import VisionCollator

av = pytest.importorskip("av")

VIDEO = {"video_maxlen": 4, "video_max_pixels": 64 * 64, "cutoff_len": 2048}  # 12 video tokens a demo clip
IMAGE = {"image_max_pixels": 112 * 112}


def write_clip(path, frames: int = 25, rate: int = 10, codec: str = "libx264", size=(64, 48)):
    """A clip whose frame k is grey level 10 * k (so a decoded frame tells its index)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 10 * k, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def indices_of(clip: Clip) -> list[int]:
    return [round(int(np.asarray(frame)[0, 0, 0]) / 10) for frame in clip.frames]


def clip_of(path, budget: VideoBudget) -> Clip:
    return read_clip(path, budget, lambda w, h: regularized_size(w, h, budget.max_pixels, budget.min_pixels, 28))


def test_frames_follow_llamafactory_sampling(tmp_path):
    mp4 = write_clip(tmp_path / "a.mp4")  # 25 frames, 2.5 s
    assert indices_of(clip_of(mp4, VideoBudget(2.0, 128, 64 * 64, 16))) == [0, 6, 12, 18, 24, 24]  # odd: last again
    assert indices_of(clip_of(mp4, VideoBudget(2.0, 3, 64 * 64, 16))) == [0, 12, 24, 24]  # video_maxlen
    assert indices_of(clip_of(mp4, VideoBudget(0.1, 128, 64 * 64, 16))) == [0, 0]  # at least one frame
    assert indices_of(clip_of(mp4, VideoBudget(20.0, 128, 64 * 64, 16))) == list(range(25)) + [24]
    mkv = write_clip(tmp_path / "b.mkv", codec="ffv1")  # Matroska: no frame count in the stream header
    assert indices_of(clip_of(mkv, VideoBudget(2.0, 6, 64 * 64, 16))) == [0, 1, 2, 3, 4, 5]  # first maxlen
    big = clip_of(mp4, VideoBudget(2.0, 128, 32 * 32, 16))  # frames into the pixel budget, 28 a side
    assert {frame.size for frame in big.frames} == {regularized_size(64, 48, 32 * 32, 16, 28)} == {(36, 28)}
    assert big.fps == pytest.approx(5 / 2.5)  # sampled frames over the length (Qwen2.5-VL's seconds per patch)
    assert sample_indices(25, 2.5, VideoBudget(2.0, 128, 1, 1)) == [0, 6, 12, 18, 24]


def test_pixels_equal_the_transformers_video_processor(tiny_qwen2vl_dir, monkeypatch):
    from transformers import AutoImageProcessor

    processor_class = qwen2vl_video_processor_class(monkeypatch)
    reference = processor_class.from_pretrained(tiny_qwen2vl_dir)  # its config lookup, on the model's files
    ours = VideoProcessing.load(tiny_qwen2vl_dir, AutoImageProcessor.from_pretrained(tiny_qwen2vl_dir, backend="pil"),
                                QWEN2_VL_VIDEO_DEFAULTS)
    assert ours.settings["size"] == dict(reference.size) and ours.temporal_patch_size == reference.temporal_patch_size
    rng = np.random.default_rng(0)
    for count, (width, height) in ((5, (84, 56)), (4, (56, 112))):  # odd count: padded by repeating the last frame
        frames = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]
        expected = reference(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)
        got = ours.pixels([Clip(frames, 2.0)])
        assert got["video_grid_thw"].tolist() == expected["video_grid_thw"].tolist()
        torch.testing.assert_close(got["pixel_values_videos"], expected["pixel_values_videos"], atol=1e-6, rtol=0)
        assert ours.tokens(count, width, height) == int(expected["video_grid_thw"].prod()) // 4


def lf_video_tokens(path, processor_size: dict, budget: VideoBudget) -> int:
    """LLaMA-Factory 0.9.5's count from the stream header alone (its Qwen-VL metadata path): sampled
    frames rounded up to even, the frame size regularized, then transformers' smart_resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = len(sample_indices(stream.frames, float(stream.duration * stream.time_base), budget))
        width, height = regularized_size(stream.width, stream.height, budget.max_pixels, budget.min_pixels, 28)
    h, w = smart_resize(height, width, 28, processor_size["shortest_edge"], processor_size["longest_edge"])
    return math.ceil((frames + frames % 2) / 2) * (h // 14) * (w // 14) // 4


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory, tiny_qwen2vl_dir, lf_demo_dir):
    root = tmp_path_factory.mktemp("vlm-video")
    cfg, layout, _ = run_stages(root, tiny_qwen2vl_dir, lf_demo_dir, "mllm_video_demo", template="qwen2_vl", **VIDEO)
    return cfg, load_from_disk(str(layout.tokenized / "train"))


def test_video_rows_equal_llamafactory_qwen2_vl_rendering(video_shards, tiny_qwen2vl_dir, lf_demo_dir):
    cfg, shards = video_shards
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    size = json.loads((tiny_qwen2vl_dir / "preprocessor_config.json").read_text())["size"]
    budget = VideoBudget.from_data(cfg.data)
    raw = json.loads((lf_demo_dir / "mllm_video_demo.json").read_text())
    assert len(shards) == len(raw) and shards.column_names == ["input_ids", "labels", "media"]  # never pixels
    for row, source in zip(shards, raw):
        (user, answer), (video,) = source["messages"], source["videos"]
        count = lf_video_tokens(lf_demo_dir / video, size, budget)
        prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  + user["content"].replace("<video>", "<|vision_start|>" + "<|video_pad|>" * count + "<|vision_end|>")
                  + "<|im_end|>\n<|im_start|>assistant\n")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt_ids + answer_ids
        assert row["labels"] == [IGNORE] * len(prompt_ids) + answer_ids
        assert row["input_ids"].count(pad) == count == 12
        media = json.loads(row["media"])
        assert [m["path"] for m in media["videos"]] == [video] and len(media["videos"][0]["sha256"]) == 64


def test_video_rows_equal_llamafactory_golden_rows(video_shards):
    """LLaMA-Factory 0.9.5's own ids and labels for these rows (bench/video_parity.py --write-fixture:
    its get_dataset with the tiny model's processor built by transformers, torchvision included)."""
    golden = json.loads((Path(__file__).parent / "fixtures" / "video_parity" / "qwen2_vl_mllm_video_demo.json")
                        .read_text())
    assert golden["keys"] == VIDEO and golden["template"] == "qwen2_vl"
    _, shards = video_shards
    assert shards["input_ids"] == golden["input_ids"] and shards["labels"] == golden["labels"]


def test_the_model_chat_template_places_the_video_itself(video_shards, tiny_qwen2vl_dir, lf_demo_dir):
    from tunepipe.data.chat.templates import ChatFormat

    cfg, shards = video_shards
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    fmt = ChatFormat(tokenizer)  # data.template unset: the model's own jinja template renders the video part
    fmt.media = MediaTokens.for_data(tiny_qwen2vl_dir, tokenizer, cfg.data)
    source = json.loads((lf_demo_dir / "mllm_video_demo.json").read_text())[0]
    row = {"messages": source["messages"], "system": "", "tools": "", "videos": json.loads(shards[0]["media"])["videos"]}
    ids = [i for turn in fmt.turns(row) for element in turn
           for i in (tokenizer(element, add_special_tokens=False)["input_ids"] if isinstance(element, str) else [element])]
    assert ids == shards[0]["input_ids"]  # the tiny model's template renders what qwen2_vl does


@pytest.fixture(scope="module")
def collator(tiny_qwen2vl_dir, lf_demo_dir, video_shards):
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    cfg, _ = video_shards
    media = MediaTokens.for_data(tiny_qwen2vl_dir, tokenizer, cfg.data)
    media.max_pixels = IMAGE["image_max_pixels"]  # the image rows below were tokenized with this budget
    return VisionCollator(tokenizer.pad_token_id, media)


def test_a_batch_of_video_and_image_rows_gives_each_sample_its_loss_alone(video_shards, collator, tmp_path_factory,
                                                                          tiny_qwen2vl_dir, lf_demo_dir):
    _, videos = video_shards
    images = load_from_disk(str(run_stages(tmp_path_factory.mktemp("vlm-video-img"), tiny_qwen2vl_dir, lf_demo_dir,
                                           "mllm_demo", template="qwen2_vl", **IMAGE)[1].tokenized / "train"))
    model = load_causal_lm(tiny_qwen2vl_dir).eval()
    rows = [videos[1], images[0], videos[0]]  # a short video row padded, an image row between two videos
    batch = collator(rows)
    assert batch["video_grid_thw"].tolist() == [[2, 4, 6], [2, 4, 6]] and batch["image_grid_thw"].shape[0] == 2
    types = batch["mm_token_type_ids"]
    assert int((types == 2).sum()) == int((batch["input_ids"] == collator.media.video_token_id).sum()) == 24
    assert_each_row_as_alone(model, collator, rows)
    # the video's positions are 3-D: its tokens share temporal / height / width indices, unlike text
    position_ids, _ = model.model.get_rope_index(batch["input_ids"][:1], types[:1], None,
                                                 batch["video_grid_thw"][:1], batch["attention_mask"][:1])
    video = position_ids[:, 0, types[0] == 2]
    assert video.shape[1] == 12 and len(set(map(tuple, video.T.tolist()))) == 12
    assert len(set(video[0].tolist())) == 2  # two temporal patches


def test_a_video_row_needs_a_model_that_takes_video(tmp_path, tiny_model_dir, lf_demo_dir):
    from tunepipe.errors import TunepipeError

    with pytest.raises(TunepipeError, match="videos but the base model is not a vision-language model"):
        run_stages(tmp_path, tiny_model_dir, lf_demo_dir, "mllm_video_demo", template="qwen", **VIDEO)
    assert not (tmp_path / "data" / "tokenized").exists()  # nothing half-written


def build_tiny_qwen2_5_vl_dir(path, qwen2vl_dir):
    """A random tiny Qwen2.5-VL beside the tiny Qwen2-VL: same tokenizer and image processor (so the same
    shards), its own vision tower (window attention, 4 tokens per second of video)."""
    import shutil

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    source = json.loads((qwen2vl_dir / "config.json").read_text())
    text = {key: source["text_config"][key] for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rope_parameters", "bos_token_id", "eos_token_id",
        "pad_token_id")}
    config = Qwen2_5_VLConfig(
        text_config=text, tie_word_embeddings=False,
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "window_size": 56, "fullatt_block_indexes": [0], "tokens_per_second": 4},
        **{key: source[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                        "vision_end_token_id")})
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    for name in qwen2vl_dir.iterdir():
        if name.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(name, path / name.name)
    return path


def test_qwen2_5_vl_reads_each_videos_seconds_per_temporal_patch(video_shards, tmp_path, tiny_qwen2vl_dir):
    model_dir = build_tiny_qwen2_5_vl_dir(tmp_path / "qwen2_5_vl", tiny_qwen2vl_dir)
    cfg, shards = video_shards
    tokenizer = load_tokenizer(model_dir)
    collator = VisionCollator(tokenizer.pad_token_id, MediaTokens.for_data(model_dir, tokenizer, cfg.data))
    rows = [shards[2], shards[0]]  # 3.mp4: 6.09 s, 1.mp4: 9.72 s; 4 frames each
    batch = collator(rows)
    # LLaMA-Factory: temporal_patch_size / (sampled frames / length)
    torch.testing.assert_close(batch["second_per_grid_ts"], torch.tensor([2 / (4 / 6.088333), 2 / (4 / 9.72)]))
    model = load_causal_lm(model_dir).eval()
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        for i, row in enumerate(rows):  # each video's own temporal spacing, in a batch as alone
            alone = model(**model_inputs(collator([row]))).logits[0]
            torch.testing.assert_close(logits[i, :len(row["input_ids"])], alone, atol=1e-5, rtol=0)
        swapped = {**model_inputs(batch), "second_per_grid_ts": batch["second_per_grid_ts"].flip(0)}
        assert not torch.allclose(model(**swapped).logits, logits, atol=1e-4)  # the positions do read it
