"""Every vision-language family tunepipe feeds images to (tiny random models, tests/fixtures/tiny_vlm_families.py):
tokens per image = the processor's own, image tokens never trained, a padded batch gives each sample its
lone logits and loss (Qwen3-VL's 3-D rotary positions included), `lora_target: all` wraps the language
model only and a step leaves the frozen vision tower and projector bit-identical."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.fixtures.tiny_vlm_families import BUILDERS
from tunepipe.config.loader import load_config
from tunepipe.data.chat.templates import ChatFormat
from tunepipe.data.sources.media import file_sha256
from tunepipe.data.tokenizing.encoding import IGNORE, Stats, encode_conversations
from tunepipe.data.vision import FAMILIES, MediaTokens
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.train.batches.collate import model_inputs
from tunepipe.train.loss import causal_lm_loss
from tunepipe.train.model.model_setup import apply_finetuning
from tunepipe.train.model.vision import VisionCollator

SIZES = {"wide.png": (100, 60), "tall.png": (40, 90)}
CONVERSATIONS = [  # two images then one: different lengths, so the second row is padded
    [{"role": "user", "content": "<image><image>Which is taller?"}, {"role": "assistant", "content": "The second."}],
    [{"role": "user", "content": "What colour is <image>?"}, {"role": "assistant", "content": "Mostly red."}],
]
IMAGES = [["wide.png", "tall.png"], ["wide.png"]]
# PaliGemma has no chat template of its own: LLaMA-Factory's `paligemma` (images in front of the sequence)
TEMPLATE = {"paligemma": "paligemma"}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm-family-images")
    for k, (name, size) in enumerate(SIZES.items()):
        pixels = torch.Generator().manual_seed(k)
        Image.frombytes("RGB", size, torch.randint(0, 256, (size[0] * size[1] * 3,), generator=pixels,
                                                   dtype=torch.uint8).numpy().tobytes()).save(folder / name)
    return folder


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory, media_dir):
    """(name, model dir, format with the model's own chat template, encoded rows, collator) for one family."""
    name = request.param
    model_dir = BUILDERS[name](tmp_path_factory.mktemp(f"tiny-{name}"))
    tokenizer = load_tokenizer(model_dir)
    fmt = ChatFormat(tokenizer, TEMPLATE.get(name))
    fmt.media = MediaTokens.load(model_dir, tokenizer, media_dir, 768 * 768, 32 * 32)
    rows = [{"messages": messages, "system": "", "tools": "",
             "images": [{"path": p, "sha256": file_sha256(media_dir / p)} for p in paths]}
            for messages, paths in zip(CONVERSATIONS, IMAGES)]
    data = load_config(None, ["data.cutoff_len=4096"]).data
    columns = encode_conversations(rows, fmt, data, "sft", eval_columns=False, stats=Stats())
    encoded = [{"input_ids": i, "labels": la, "media": m}
               for i, la, m in zip(columns["input_ids"], columns["labels"], columns["media"])]
    return name, model_dir, fmt, encoded, VisionCollator(tokenizer.pad_token_id, fmt.media)


def parts(content: str) -> list[dict]:
    out = []
    for k, text in enumerate(content.split("<image>")):
        out += [{"type": "image"}] if k else []
        out += [{"type": "text", "text": text}] if text else []
    return out


def test_tokens_per_image_are_the_processors_and_never_trained(family, media_dir):
    name, model_dir, fmt, encoded, _ = family
    media = fmt.media
    for row, messages, paths in zip(encoded, CONVERSATIONS, IMAGES):
        images = [Image.open(media_dir / p).convert("RGB") for p in paths]
        if FAMILIES[name].prefix_images:  # PaliGemma's processor: images, BOS, the prompt and "\n" open the row
            from transformers import AutoProcessor

            prompt = messages[0]["content"].replace("<image>", "")
            expected = AutoProcessor.from_pretrained(model_dir)(text=[prompt], images=[images])["input_ids"][0]
            assert row["input_ids"][:len(expected)] == list(expected)
        elif FAMILIES[name].expansion == "processor":  # the whole processor on the chat-template text
            from transformers import AutoProcessor

            text = fmt.tokenizer.apply_chat_template([{"role": m["role"], "content": parts(m["content"])}
                                                      for m in messages], tokenize=False)
            expected = AutoProcessor.from_pretrained(model_dir)(text=[text], images=[images],
                                                                add_special_tokens=False)["input_ids"][0]
            assert row["input_ids"] == list(expected)
        else:  # Qwen3-VL (its processor needs torchvision): the image processor's grid / merge^2 per image
            grid = media.image_processor(images, return_tensors="pt")["image_grid_thw"]
            assert row["input_ids"].count(media.image_token_id) == int(grid.prod(dim=1).sum()) // 4
        assert row["input_ids"].count(media.image_token_id) >= len(paths)
        assert all(label == IGNORE for token, label in zip(row["input_ids"], row["labels"])
                   if token == media.image_token_id)
        assert any(label != IGNORE for label in row["labels"])  # the answer trains


def test_a_batch_gives_each_sample_its_loss_alone(family):
    _, model_dir, _, encoded, collator = family
    model = load_causal_lm(model_dir).eval()
    assert len(encoded[0]["input_ids"]) != len(encoded[1]["input_ids"])
    batch = collator(encoded)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        for i, row in enumerate(encoded):
            alone = collator([row])
            n = len(row["input_ids"])
            torch.testing.assert_close(logits[i, :n], model(**model_inputs(alone)).logits[0], atol=2e-5, rtol=0)
            targets = batch["shift_labels"][i, :n]
            in_batch = torch.nn.functional.cross_entropy(logits[i, :n][targets != -100], targets[targets != -100])
            torch.testing.assert_close(in_batch, causal_lm_loss(model, alone), atol=2e-5, rtol=0)


def test_lora_all_wraps_the_language_model_and_frozen_parts_stay_bit_identical(family):
    name, model_dir, _, encoded, collator = family
    family_keys = FAMILIES[name]
    torch.manual_seed(0)
    model = apply_finetuning(load_causal_lm(model_dir), load_config(None, ["train.finetuning_type=lora"]).train)
    wrapped = {n for n, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped and all(any(key in n for key in family_keys.language_keys) for n in wrapped)
    frozen_keys = family_keys.vision_keys + family_keys.projector_keys
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if any(key in n for key in frozen_keys)}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert frozen and lora
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    causal_lm_loss(model, collator(encoded)).backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in frozen.items())
    assert any(not torch.equal(after[n], value) for n, value in lora.items())


@pytest.mark.parametrize("family", ["paligemma"], indirect=True)
def test_paligemma_refuses_a_chat_template_that_writes_image_tokens(family):
    from tunepipe.errors import TunepipeError

    _, _, fmt, _, _ = family
    jinja = ChatFormat(fmt.tokenizer, None)  # the tiny tokenizer's template renders <image> for an image part
    jinja.media = fmt.media
    row = {"messages": CONVERSATIONS[1], "system": "", "tools": "", "images": [{"path": "wide.png", "sha256": "x"}]}
    with pytest.raises(TunepipeError, match="set data.template: paligemma"):
        jinja.turns(row)
