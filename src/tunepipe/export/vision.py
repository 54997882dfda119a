"""Exporting a vision-language model: its processor files, and probes that carry pictures.

The merged model is the whole VLM (vision tower, projector, language model; LoRA only ever
wraps the language model's linears, so merging touches only those). Beside the weights and
the tokenizer the export needs the image processor's files, or neither `tunepipe chat` nor
transformers' `AutoProcessor` can feed it a picture: they are copied from the base model.
The chat template is the tokenizer's `chat_template.jinja`, which processors read too.

The equivalence check (export/merge.py) must exercise the vision path: a probe without a
picture never runs the vision tower or the image-token positions. So a VLM's probes are
chat prompts with one or two pictures, drawn here from fixed arithmetic patterns (no
randomness, no file a user must supply), run through the family's processor exactly as
training runs rows (`data.vision.MediaTokens`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tunepipe.config import Config
from tunepipe.data.chat.templates import ChatFormat
from tunepipe.data.sources.media import file_sha256
from tunepipe.data.vision import MediaTokens

# what a processor is saved as besides the tokenizer's files (transformers' processor / image /
# video processor configs; a legacy chat_template.json only where no chat_template.jinja is written)
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json")
# (question, picture sizes): one picture, then two of other shapes (each token count differs)
PROBES = [("<image>What is in this picture?", [(56, 84)]),
          ("Compare <image> with <image>.", [(84, 56), (70, 70)])]


def copy_processor_files(model_dir: Path, export_dir: Path) -> list[str]:
    """Copy the base model's processor files the export lacks; returns their names."""
    copied = []
    for name in PROCESSOR_FILES:
        source, target = Path(model_dir) / name, Path(export_dir) / name
        if name == "chat_template.json" and (Path(export_dir) / "chat_template.jinja").is_file():
            continue  # the template training used is already there; a second one would contradict it
        if source.is_file() and not target.exists():
            shutil.copyfile(source, target)
            copied.append(name)
    return copied


def pattern_image(width: int, height: int):
    """A fixed picture: colour ramps across and down, a checker in the blue channel."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                       ((x // 7 + y // 7) % 2) * 255], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def vision_probes(cfg: Config, model_dir: Path, tokenizer) -> list[dict]:
    """Forward inputs (input_ids + the pictures' pixel inputs) of the probe chats with pictures."""
    import torch

    media = MediaTokens.load(model_dir, tokenizer, Path(tempfile.gettempdir()), cfg.data.image_max_pixels,
                             cfg.data.image_min_pixels)
    fmt = ChatFormat(tokenizer, cfg.data.template)  # the template's own system prompt and date: fixed probes
    fmt.media = media
    probes = []
    with tempfile.TemporaryDirectory(prefix="tunepipe-probe-") as folder:
        media.media_dir = Path(folder)
        for question, sizes in PROBES:
            refs = []
            for k, size in enumerate(sizes):
                path = Path(folder) / f"probe-{len(probes)}-{k}.png"
                pattern_image(*size).save(path)
                refs.append({"path": path.name, "sha256": file_sha256(path)})
            ids = torch.tensor([fmt.prompt_ids("", [{"role": "user", "content": question}], refs)])
            probes.append({"input_ids": ids, **media.model_inputs(ids, [json.dumps({"images": refs})])})
    return probes
