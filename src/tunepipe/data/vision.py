"""Vision-language models: how many tokens an image becomes, and the pixels the model reads.

The family's own image processor (transformers' `AutoImageProcessor`, PIL backend) decides
an image's token count and computes its pixels; tunepipe places the tokens. Why not the
family's `AutoProcessor`: in transformers 5.x `Qwen2VLProcessor` (and the Qwen2.5/3-VL
ones) cannot be built without torchvision (their video processor needs it), and no
torchvision that loads beside the CPU torch is installable on the machine the tests
run on. The PIL image processor is the same code on a GPU machine, so both run one path
(docs/architecture.md, "Vision-language models").

Each image goes through LLaMA-Factory's regularization first (scaled into
`[image_min_pixels, image_max_pixels]` keeping the aspect ratio, then the Qwen-VL
family's minimum side of 28 and maximum aspect ratio of 200), so the same data and
keys give LLaMA-Factory's token counts. The tokenize stage counts from the image's
size alone (`image_tokens`); the collator regularizes and runs the processor
(`pixel_inputs`); a test checks both agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.data.media import PLACEHOLDERS, file_sha256
from tunepipe.errors import TunepipeError


@dataclass(frozen=True)
class Family:
    """What differs between vision-language families: the config fields naming the media tokens."""

    image_token_field: str = "image_token_id"
    video_token_field: str = "video_token_id"
    start_token_field: str = "vision_start_token_id"
    end_token_field: str = "vision_end_token_id"
    min_side: int = 28  # Qwen-VL: a side below 28 pixels is padded up (LLaMA-Factory's Qwen2VLPlugin)
    # module-name parts of each component (LLaMA-Factory's composite-model registry uses the same split)
    vision_keys: tuple[str, ...] = ("visual.patch_embed", "visual.blocks")
    projector_keys: tuple[str, ...] = ("visual.merger",)
    language_keys: tuple[str, ...] = ("language_model", "lm_head")


# config.json model_type -> family; the Qwen-VL models share their media-token scheme
FAMILIES = {"qwen2_vl": Family(), "qwen2_5_vl": Family()}


def family_of(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type)


@dataclass
class MediaTokens:
    """One vision-language model's media tokens, its image processor and the pixel budget."""

    image_processor: object
    image_token: str
    image_token_id: int
    start_token: str
    end_token: str
    media_dir: Path
    max_pixels: int
    min_pixels: int
    family: Family
    store_dir: Path | None = None  # the media store (images held inside datasets, data/media.py)
    counts: dict[str, int] = field(default_factory=dict)  # sha256 -> tokens (images repeat)
    verified: set = field(default_factory=set)  # (path, sha256) whose bytes were checked

    @classmethod
    def load(cls, model_dir: Path, tokenizer, media_dir: Path, max_pixels: int, min_pixels: int) -> MediaTokens:
        from transformers import AutoImageProcessor

        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        family = FAMILIES.get(config.get("model_type"))
        if family is None:
            raise TunepipeError(f"{model_dir}: model_type {config.get('model_type')!r} is a vision-language model "
                                "tunepipe cannot feed images to yet",
                                hint=f"supported: {', '.join(sorted(FAMILIES))}")
        token = {name: tokenizer.convert_ids_to_tokens(config[getattr(family, f"{name}_token_field")])
                 for name in ("image", "start", "end")}
        processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        return cls(processor, token["image"], config[family.image_token_field], token["start"], token["end"],
                   Path(media_dir), max_pixels, min_pixels, family)

    @classmethod
    def for_data(cls, model_dir: Path, tokenizer, data, store_dir: Path | None = None) -> MediaTokens:
        """From the `data` config group: media_dir (default dataset_dir) and the image pixel budget;
        `store_dir`: the stage's media store."""
        media = cls.load(model_dir, tokenizer, Path(data.media_dir or data.dataset_dir), data.image_max_pixels,
                         data.image_min_pixels)
        media.store_dir = store_dir
        return media

    def file(self, ref: dict) -> Path:
        """Where a reference's image is: in media_dir, or in the media store when the dataset held it."""
        if ref.get("stored"):
            if self.store_dir is None:
                raise TunepipeError(f"image {ref['path']} was held in the dataset, and no media store is given",
                                    hint="re-run validate and tokenize (dvc repro does)")
            return self.store_dir / ref["path"]
        return self.media_dir / ref["path"]

    # -- the text: placeholders -> media tokens --------------------------------------------
    def marker(self) -> str:
        """What one `<image>` becomes in a named template's text before expansion (LLaMA-Factory's
        Qwen2-VL plugin: start, one image token, end)."""
        return f"{self.start_token}{self.image_token}{self.end_token}"

    def expand(self, turns: list[list], images: list[dict]) -> list[list]:
        """Every image token in the turns' texts (one per image, in order) becomes that image's
        count of image token ids; the texts around it are tokenized as before."""
        counts = iter([self.image_tokens(ref) for ref in images])
        out, seen = [], 0
        for turn in turns:
            elements = []
            for element in turn:
                if not isinstance(element, str) or self.image_token not in element:
                    elements.append(element)
                    continue
                pieces = element.split(self.image_token)
                for k, piece in enumerate(pieces):
                    if k:
                        count = next(counts, None)
                        if count is None:
                            break
                        elements.extend([self.image_token_id] * count)
                        seen += 1
                    elements.append(piece)
            out.append(elements)
        if seen != len(images):
            raise TunepipeError(f"the chat template rendered {seen} image token(s) {self.image_token!r} for "
                                f"{len(images)} image(s)", hint="set data.template to the family's template "
                                                                "(qwen2_vl for Qwen2-VL)")
        return out

    def mask(self, input_ids: list[int], labels: list[int]) -> list[int]:
        """Labels with every image token ignored: an image is input, never a prediction target."""
        return [-100 if token == self.image_token_id else label for token, label in zip(input_ids, labels)]

    # -- the pixels ---------------------------------------------------------------------------
    def image_tokens(self, ref: dict) -> int:
        """How many tokens the processor turns the image into (from its size: no pixels decoded)."""
        if ref["sha256"] not in self.counts:
            from PIL import Image

            with Image.open(self.file(ref)) as image:
                width, height = regularized_size(image.width, image.height, self.max_pixels, self.min_pixels,
                                                 self.family.min_side)
            patches = self.image_processor.get_number_of_image_patches(height, width, {})
            self.counts[ref["sha256"]] = patches // self.image_processor.merge_size ** 2
        return self.counts[ref["sha256"]]

    def verify(self, ref: dict) -> None:
        """The file still holds the bytes validate hashed (once per file): a changed image after
        tokenization would silently disagree with its token count."""
        key = (ref["path"], ref["sha256"])
        if key in self.verified:
            return
        path = self.file(ref)
        if not path.is_file() or file_sha256(path) != ref["sha256"]:
            raise TunepipeError(f"{path}: changed or missing since the validate stage hashed it",
                                hint="re-run validate and tokenize (dvc repro does)")
        self.verified.add(key)

    def pixel_inputs(self, images: list[dict]) -> dict:
        """The processor's model inputs (pixel_values, image_grid_thw) for a batch's images, in order."""
        return self.image_processor([self.load_image(ref) for ref in images], return_tensors="pt")

    def model_inputs(self, input_ids, media_column: list[str | None]) -> dict:
        """The image inputs of a batch (`input_ids` [rows, width], each row's `media` JSON): pixel_values,
        image_grid_thw and mm_token_type_ids (1 on image tokens, 0 on text: what the model computes its
        3-D rotary positions from); empty when the rows hold no image."""
        images = [ref for media in media_column if media for ref in json.loads(media)["images"]]
        if not images:
            return {}
        inputs = self.pixel_inputs(images)
        return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
                "mm_token_type_ids": (input_ids == self.image_token_id).long()}

    def load_image(self, ref: dict):
        from PIL import Image

        self.verify(ref)
        with Image.open(self.file(ref)) as image:
            width, height = regularized_size(image.width, image.height, self.max_pixels, self.min_pixels,
                                             self.family.min_side)
            image = image.resize((width, height)) if (width, height) != image.size else image.copy()
        return image if image.mode == "RGB" else image.convert("RGB")


def regularized_size(width: int, height: int, max_pixels: int, min_pixels: int, min_side: int) -> tuple[int, int]:
    """The size LLaMA-Factory resizes an image to before the processor: into the pixel budget
    (aspect kept, sides truncated to ints), at least `min_side` a side, aspect ratio at most 200."""
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if min(width, height) < min_side:
        width, height = max(width, min_side), max(height, min_side)
    if width / height > 200:
        width = height * 180
    if height / width > 200:
        height = width * 180
    return width, height


def image_parts(content: str) -> list[dict] | str:
    """A message's text as the content parts chat templates read (`{"type": "image"}` where each
    `<image>` was), or the text itself when it has no image."""
    marker = PLACEHOLDERS["images"]
    if marker not in content:
        return content
    parts = []
    for k, text in enumerate(content.split(marker)):
        if k:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts
