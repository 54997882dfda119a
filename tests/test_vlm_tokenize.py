"""tokenize with images (tiny Qwen2-VL): the image processor decides each image's token count, the ids
equal LLaMA-Factory's qwen2_vl rendering (and the model's own chat template's), image tokens are never
trained, and the shards keep media references, never pixels."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk
from PIL import Image

from tests.test_tokenize import run_stages
from tunepipe.data.tokenizing.encoding import IGNORE
from tunepipe.data.vision import regularized_size
from tunepipe.errors import TunepipeError
from tunepipe.models.base import load_tokenizer

SMALL = {"image_max_pixels": 112 * 112, "cutoff_len": 2048}  # a few dozen tokens an image


def processor_count(tiny_qwen2vl_dir, path, max_pixels=SMALL["image_max_pixels"], min_pixels=32 * 32) -> int:
    """Tokens for one image, the long way: LLaMA-Factory's resize, the processor on the pixels, grid / merge^2."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_qwen2vl_dir, backend="pil")
    with Image.open(path) as image:
        size = regularized_size(image.width, image.height, max_pixels, min_pixels, 28)
        grid = processor([image.convert("RGB").resize(size)], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.merge_size ** 2


def lf_text(messages, counts, system="You are a helpful assistant.") -> list[tuple[str, bool]]:
    """LLaMA-Factory 0.9.5's qwen2_vl template + Qwen2VLPlugin as (text, trained) pieces."""
    counts = iter(counts)

    def expand(text):
        while "<image>" in text:
            text = text.replace("<image>", "<|vision_start|>" + "<|image_pad|>" * next(counts) + "<|vision_end|>", 1)
        return text
    pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for m in messages:
        if m["role"] == "user":
            pieces.append((f"<|im_start|>user\n{expand(m['content'])}<|im_end|>\n<|im_start|>assistant\n", False))
        else:
            pieces.append((f"{m['content']}<|im_end|>\n", True))
    return pieces


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory, tiny_qwen2vl_dir, lf_demo_dir):
    root = tmp_path_factory.mktemp("vlm-tok")
    return {template: load_from_disk(str(run_stages(root / str(template), tiny_qwen2vl_dir, lf_demo_dir, "mllm_demo",
                                                    template=template or "null", **SMALL)[1].tokenized / "train"))
            for template in ("qwen2_vl", None)}


def test_qwen2_vl_template_equals_llamafactory_rendering(demo_shards, tiny_qwen2vl_dir, lf_demo_dir):
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    raw = json.loads((lf_demo_dir / "mllm_demo.json").read_text())
    shards = demo_shards["qwen2_vl"]
    assert len(shards) == len(raw) and "pixel_values" not in shards.column_names
    for row, source in zip(shards, raw):
        counts = [processor_count(tiny_qwen2vl_dir, lf_demo_dir / p) for p in source["images"]]
        ids, labels = [], []
        for text, trained in lf_text(source["messages"], counts):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        labels[0] = IGNORE
        assert row["input_ids"] == ids and row["labels"] == labels
        assert row["input_ids"].count(image_pad) == sum(counts) > 0
        media = json.loads(row["media"])["images"]
        assert [m["path"] for m in media] == source["images"] and all(len(m["sha256"]) == 64 for m in media)


def test_model_chat_template_places_the_images_itself(demo_shards, tiny_qwen2vl_dir, lf_demo_dir):
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    raw = json.loads((lf_demo_dir / "mllm_demo.json").read_text())
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, source in zip(demo_shards[None], raw):
        counts = [processor_count(tiny_qwen2vl_dir, lf_demo_dir / p) for p in source["images"]]
        messages = [{"role": m["role"], "content": parts(m["content"])} for m in source["messages"]]
        pieces = tokenizer.apply_chat_template(messages, tokenize=False).split("<|image_pad|>")
        assert len(pieces) == len(counts) + 1  # the template rendered one image token per image
        text = pieces[0] + "".join("<|image_pad|>" * n + piece for n, piece in zip(counts, pieces[1:]))
        assert row["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(label == IGNORE for token, label in zip(row["input_ids"], row["labels"]) if token == pad)


def parts(content: str) -> list[dict]:
    out = []
    for k, text in enumerate(content.split("<image>")):
        out += [{"type": "image"}] if k else []
        out += [{"type": "text", "text": text}] if text else []
    return out


def test_image_rows_need_a_vision_model_and_template(tmp_path, tiny_model_dir, tiny_qwen2vl_dir, lf_demo_dir):
    with pytest.raises(TunepipeError, match="not a vision-language model"):
        run_stages(tmp_path / "a", tiny_model_dir, lf_demo_dir, "mllm_demo", **SMALL)
    with pytest.raises(TunepipeError, match="template qwen takes none"):
        run_stages(tmp_path / "b", tiny_qwen2vl_dir, lf_demo_dir, "mllm_demo", template="qwen", **SMALL)


def test_an_image_row_too_long_is_dropped_never_cut(tmp_path, tiny_qwen2vl_dir):
    from tunepipe.config.loader import load_config
    from tunepipe.data.chat.templates import ChatFormat
    from tunepipe.data.sources.media import file_sha256
    from tunepipe.data.tokenizing.encoding import Stats, encode_conversations
    from tunepipe.data.vision import MediaTokens

    Image.new("RGB", (56, 56), (1, 2, 3)).save(tmp_path / "a.png")  # 2x2 merged patches: 4 image tokens
    ref = {"path": "a.png", "sha256": file_sha256(tmp_path / "a.png")}
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    fmt = ChatFormat(tokenizer, "qwen2_vl")
    fmt.media = MediaTokens.load(tiny_qwen2vl_dir, tokenizer, tmp_path, 768 * 768, 32 * 32)
    turns = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Black, almost."}]
    row = {"messages": turns, "system": "", "tools": "", "images": [ref]}
    text = {"messages": [{"role": "user", "content": "Colour? " * 20}, turns[1]], "system": "", "tools": ""}
    data = load_config(None, ["data.cutoff_len=24"]).data
    stats = Stats()
    columns = encode_conversations([row, text], fmt, data, "sft", eval_columns=False, stats=stats)
    assert stats.dropped_overlong == 1 and stats.truncated == 1  # the image row dropped, the text row cut
    assert len(columns["input_ids"]) == 1 and json.loads(columns["media"][0]) == {"images": []}
    full = encode_conversations([row], fmt, load_config(None, ["data.cutoff_len=1024"]).data, "sft", False, Stats())
    assert full["input_ids"][0].count(fmt.media.image_token_id) == fmt.media.image_tokens(ref) == 4


def test_a_changed_image_is_refused_at_training(tmp_path, tiny_qwen2vl_dir):
    from tunepipe.data.sources.media import file_sha256
    from tunepipe.data.vision import MediaTokens

    Image.new("RGB", (56, 56), (1, 2, 3)).save(tmp_path / "a.png")
    ref = {"path": "a.png", "sha256": file_sha256(tmp_path / "a.png")}
    media = MediaTokens.load(tiny_qwen2vl_dir, load_tokenizer(tiny_qwen2vl_dir), tmp_path, 768 * 768, 32 * 32)
    assert media.pixel_inputs([ref])["image_grid_thw"].tolist() == [[1, 4, 4]]
    Image.new("RGB", (56, 56), (9, 2, 3)).save(tmp_path / "a.png")
    fresh = MediaTokens.load(tiny_qwen2vl_dir, load_tokenizer(tiny_qwen2vl_dir), tmp_path, 768 * 768, 32 * 32)
    with pytest.raises(TunepipeError, match="changed or missing since the validate stage hashed it"):
        fresh.pixel_inputs([ref])
