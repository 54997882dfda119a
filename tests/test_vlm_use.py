"""Using a tuned tiny Qwen2-VL: merge/export keeps the processor files and equals base + adapter on
prompts WITH pictures (reloaded with plain transformers), GGUF export is refused naming the mmproj
file, eval generation with pictures equals greedy decoding by hand, and `tunepipe chat` answers about
a picture (`--image`, `/image`) as the model does on the same prompt built the LLaMA-Factory way."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from tunepipe.config.loader import load_config
from tunepipe.data.chat.templates import ChatFormat
from tunepipe.data.sources.media import file_sha256
from tunepipe.data.vision import MediaTokens
from tunepipe.errors import TunepipeError
from tunepipe.evaluate.generation import Example, generate
from tunepipe.evaluate.images import EvalImages
from tunepipe.export.merge import run_export
from tunepipe.export.vision import vision_probes
from tunepipe.layout import Layout
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.models.trained import apply_adapters

MAX_PIXELS, MIN_PIXELS = 112 * 112, 32 * 32
KEYS = [f"data.image_max_pixels={MAX_PIXELS}", f"data.image_min_pixels={MIN_PIXELS}", "data.template=qwen2_vl",
        "tracking.report_to=none", "eval.max_new_tokens=5"]


@pytest.fixture(scope="module")
def vlm_adapter(tiny_qwen2vl_dir, tmp_path_factory):
    """A LoRA adapter on the language model (lora_target all, tower frozen) with random B matrices."""
    from tunepipe.train.model.model_setup import apply_finetuning

    train = load_config(None, ["train.finetuning_type=lora", "train.lora_rank=4"]).train
    torch.manual_seed(0)
    model = apply_finetuning(load_causal_lm(tiny_qwen2vl_dir), train)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("vlm-adapter") / "adapter"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tuned(tiny_qwen2vl_dir, vlm_adapter):
    return apply_adapters(load_causal_lm(tiny_qwen2vl_dir), [vlm_adapter])


def test_export_keeps_the_processor_and_equals_base_plus_adapter_with_pictures(tiny_qwen2vl_dir, vlm_adapter,
                                                                               tuned, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    export = tmp_path / "export"
    cfg = load_config(None, KEYS + [f"model.model_name_or_path={tiny_qwen2vl_dir}",
                                    f"model.adapter_name_or_path={vlm_adapter}", f"export.export_dir={export}"])
    metrics = run_export(cfg, Layout.at(tmp_path))
    assert metrics["probe_images"] == 3 and metrics["max_abs_logit_diff"] <= metrics["logit_tolerance"]
    assert (export / "preprocessor_config.json").is_file() and (export / "chat_template.jinja").is_file()
    ours = AutoImageProcessor.from_pretrained(export, backend="pil")
    assert ours.to_dict() == AutoImageProcessor.from_pretrained(tiny_qwen2vl_dir, backend="pil").to_dict()
    # plain transformers, no tunepipe loader: the whole VLM (tower included) reloads and matches
    merged = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    probes = vision_probes(cfg, export, load_tokenizer(export))
    with torch.no_grad():
        for probe in probes:
            assert int(probe["mm_token_type_ids"].sum()) > 0
            torch.testing.assert_close(merged(**probe).logits, tuned(**probe).logits, atol=1e-4, rtol=0)
        base = load_causal_lm(tiny_qwen2vl_dir).eval()
        assert (base(**probes[0]).logits - tuned(**probes[0]).logits).abs().max() > 1e-2  # the adapter matters


def test_gguf_export_of_a_vlm_is_refused_naming_the_mmproj_file(tiny_qwen2vl_dir, vlm_adapter, tmp_path):
    export = tmp_path / "export"
    cfg = load_config(None, KEYS + [f"model.model_name_or_path={tiny_qwen2vl_dir}",
                                    f"model.adapter_name_or_path={vlm_adapter}", f"export.export_dir={export}",
                                    "export.export_gguf=q8_0"])
    with pytest.raises(TunepipeError, match="mmproj"):
        run_export(cfg, Layout.at(tmp_path))
    assert not export.exists()


def picture_prompt(tokenizer, media: MediaTokens, question: str, paths: list[str]) -> tuple[list[int], str]:
    """(prompt ids, media JSON) for a question about pictures in media_dir, by the qwen2_vl template."""
    refs = [{"path": path, "sha256": file_sha256(media.media_dir / path)} for path in paths]
    fmt = ChatFormat(tokenizer, "qwen2_vl")
    fmt.media = media
    ids = fmt.prompt_ids("", [{"role": "user", "content": "<image>" * len(paths) + question}], refs)
    return ids, json.dumps({"images": refs})


def greedy_by_hand(model, media: MediaTokens, ids: list[int], media_json: str, steps: int, stop: int) -> list[int]:
    """Greedy decoding with a full forward per token (no cache, no padding), pictures passed each time."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            row = torch.tensor([ids])
            token = int(model(input_ids=row, **media.model_inputs(row, [media_json])).logits[0, -1].argmax())
            if token == stop:
                break
            ids.append(token)
            new.append(token)
    return new


def test_eval_generation_with_pictures_equals_greedy_by_hand(tiny_qwen2vl_dir, tuned, lf_demo_dir):
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    media = MediaTokens.load(tiny_qwen2vl_dir, tokenizer, lf_demo_dir, MAX_PIXELS, MIN_PIXELS)
    prompts = [picture_prompt(tokenizer, media, "Who is this?", ["mllm_demo_data/1.jpg"]),
               picture_prompt(tokenizer, media, "What differs?", ["mllm_demo_data/2.jpg", "mllm_demo_data/3.jpg"])]
    assert len(prompts[0][0]) != len(prompts[1][0])  # the batch is left-padded
    examples = [Example(ids, "", media_json) for ids, media_json in prompts]
    eval_cfg = load_config(None, KEYS).eval
    answers = generate(tuned, tokenizer, [e.prompt_ids for e in examples], eval_cfg, batch_size=2, seed=0,
                       image_inputs=EvalImages(media, None, tokenizer.pad_token_id).prompts(examples))
    for (ids, media_json), answer in zip(prompts, answers):
        by_hand = greedy_by_hand(tuned, media, ids, media_json, eval_cfg.max_new_tokens, tokenizer.eos_token_id)
        assert by_hand and answer == tokenizer.decode(by_hand, skip_special_tokens=True).strip()


def test_chat_answers_about_a_picture(tiny_qwen2vl_dir, vlm_adapter, tuned, lf_demo_dir, tmp_path, monkeypatch,
                                      capsys):
    from tunepipe.cli import main

    picture = lf_demo_dir / "mllm_demo_data" / "1.jpg"
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_qwen2vl_dir}\nadapter_name_or_path: {vlm_adapter}\n"
                   f"template: qwen2_vl\nimage_max_pixels: {MAX_PIXELS}\nimage_min_pixels: {MIN_PIXELS}\n"
                   "max_new_tokens: 5\nreport_to: none\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {tmp_path / 'nope.png'}\nWho is this?\n/exit\n"))
    assert main(["chat", str(cfg), "--image", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "error: /image" in out and "not found" in out  # a bad path is reported, the chat goes on
    answer = next(line for line in out.splitlines() if line.startswith("Assistant: "))[len("Assistant: "):]
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    media = MediaTokens.load(tiny_qwen2vl_dir, tokenizer, lf_demo_dir, MAX_PIXELS, MIN_PIXELS)
    ids, media_json = picture_prompt(tokenizer, media, "Who is this?", ["mllm_demo_data/1.jpg"])
    by_hand = greedy_by_hand(tuned, media, ids, media_json, 5, tokenizer.eos_token_id)
    assert by_hand and answer == tokenizer.decode(by_hand, skip_special_tokens=True).strip()
