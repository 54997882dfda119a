"""Vision-language models: how many tokens an image becomes, and the pixels the model reads.

The family's own image processor (transformers' `AutoImageProcessor`, PIL backend) decides
an image's token count and computes its pixels; tunepipe places the tokens. Why not the
family's `AutoProcessor`: in transformers 5.x `Qwen2VLProcessor` (and the Qwen2.5/3-VL
ones) cannot be built without torchvision (their video processor needs it), and no
torchvision that loads beside the CPU torch is installable on the machine the tests
run on. The PIL image processor is the same code on a GPU machine, so both run one path
(docs/architecture.md, "Vision-language models"). Families whose `AutoProcessor` builds without
torchvision (LLaVA, LLaVA-NeXT, Gemma 3, PaliGemma, Idefics3) let it write each image's text
(`Family.expansion`, `MediaTokens.image_text`).

Each image goes through LLaMA-Factory's regularization first (scaled into
`[image_min_pixels, image_max_pixels]` keeping the aspect ratio, then the Qwen-VL
family's minimum side of 28 and maximum aspect ratio of 200), so the same data and
keys give LLaMA-Factory's token counts. The tokenize stage counts from the image's
size alone (`image_tokens`); the collator regularizes and runs the processor
(`pixel_inputs`); a test checks both agree. Videos (Qwen-VL families): video.py samples
and patches the frames; `video_tokens` counts them from the same frames the collator
feeds (tests/test_vlm_video.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunepipe.data.sources.media import PLACEHOLDERS, file_sha256
from tunepipe.data.video import VIDEO_FAMILIES, VideoBudget, VideoFamily, VideoProcessing, read_clip
from tunepipe.errors import TunepipeError


@dataclass(frozen=True)
class Family:
    """What differs between vision-language families: the media tokens, how an image's tokens are
    counted, the module names of each part and the extra model inputs."""

    image_token_field: str = "image_token_id"  # config field: the id every image feature takes
    video_token_field: str = "video_token_id"
    start_token_field: str = "vision_start_token_id"
    end_token_field: str = "vision_end_token_id"
    # "grid": Qwen-VL, tokens = image patches / merge^2 from the size alone, wrapped in start / end by the
    # text; "processor": the family's processor writes an image's text (`replace_image_token`)
    expansion: str = "grid"
    min_side: int = 28  # Qwen-VL: a side below 28 pixels is padded up (LLaMA-Factory's Qwen2VLPlugin); 0: none
    # module-name parts of each component (LLaMA-Factory's composite-model registry uses the same split)
    vision_keys: tuple[str, ...] = ("visual.patch_embed", "visual.blocks")
    projector_keys: tuple[str, ...] = ("visual.merger",)
    language_keys: tuple[str, ...] = ("language_model", "lm_head")
    pixel_keys: tuple[str, ...] = ("pixel_values", "image_grid_thw")  # the image processor outputs the model reads
    type_ids_key: str | None = "mm_token_type_ids"  # 1 on image tokens (Qwen's 3-D positions, Gemma 3's mask)
    image_kwargs: tuple = ()  # extra image-processor arguments (Idefics3: the tile grid it cut)
    # PaliGemma (LLaMA-Factory's PaliGemmaPlugin): `<image>` leaves the text and every image's tokens go
    # in front of the whole sequence; type ids 0 on them (the bidirectional prefix), 1 on the text
    prefix_images: bool = False


QWEN_VL = Family()
# LLaVA-1.5 / LLaVA-NeXT / Gemma 3 / PaliGemma / Idefics3 (SmolVLM's predecessor): their processors build without
# torchvision; each image's text (how many image tokens, tiles, markers) is the processor's
LLAVA = Family(expansion="processor", min_side=0, vision_keys=("vision_tower",),
               projector_keys=("multi_modal_projector",), pixel_keys=("pixel_values",), type_ids_key=None)
FAMILIES = {
    "qwen2_vl": QWEN_VL, "qwen2_5_vl": QWEN_VL,
    # Qwen3-VL's deepstack mergers project vision features into the language model, as the merger does
    "qwen3_vl": Family(projector_keys=("visual.merger", "visual.deepstack_merger_list")),
    # Qwen3.5 / Qwen3.5-MoE: Qwen3-VL's vision tower without the deepstack mergers (LLaMA-Factory 0.9.5
    # runs their templates with its qwen3_vl plugin); the language model mixes linear and full attention
    "qwen3_5": QWEN_VL, "qwen3_5_moe": QWEN_VL,
    "llava": LLAVA,
    "llava_next": replace(LLAVA, pixel_keys=("pixel_values", "image_sizes")),
    "gemma3": replace(LLAVA, type_ids_key="token_type_ids"),
    "paligemma": replace(LLAVA, type_ids_key="token_type_ids", prefix_images=True),
    "idefics3": replace(LLAVA, vision_keys=("vision_model",), projector_keys=("connector",),
                        language_keys=("text_model", "lm_head"), pixel_keys=("pixel_values", "pixel_attention_mask"),
                        image_kwargs=(("return_row_col_info", True),)),
}


def family_of(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type)


@dataclass
class MediaTokens:
    """One vision-language model's media tokens, its image processor and the pixel budget."""

    image_processor: object
    image_token: str  # the token every image feature takes (masked in the labels)
    image_token_id: int
    start_token: str
    end_token: str
    media_dir: Path
    max_pixels: int
    min_pixels: int
    family: Family
    processor: object = None  # "processor" families: the whole processor (it writes each image's text)
    placeholder: str = ""  # the token a template writes for one image, replaced by the image's text
    store_dir: Path | None = None  # the media store (images held inside datasets, data/sources/media.py)
    counts: dict[str, int] = field(default_factory=dict)  # sha256 -> tokens (images repeat)
    texts: dict[str, str] = field(default_factory=dict)  # sha256 -> the image's text ("processor" families)
    verified: set = field(default_factory=set)  # (path, sha256) whose bytes were checked
    # videos (set by enable_video; None: the model takes none)
    video_token: str | None = None
    video_token_id: int | None = None
    video: VideoProcessing | None = None
    video_family: VideoFamily | None = None
    video_budget: VideoBudget | None = None

    @classmethod
    def load(cls, model_dir: Path, tokenizer, media_dir: Path, max_pixels: int, min_pixels: int) -> MediaTokens:
        from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

        config = AutoConfig.from_pretrained(model_dir)
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise TunepipeError(f"{model_dir}: model_type {config.model_type!r} is a vision-language model "
                                "tunepipe cannot feed images to yet",
                                hint=f"supported: {', '.join(sorted(FAMILIES))}")
        image_id = getattr(config, family.image_token_field)
        image = tokenizer.convert_ids_to_tokens(image_id)
        if family.expansion == "processor":
            processor = AutoProcessor.from_pretrained(model_dir)
            return cls(processor.image_processor, image, image_id, "", "", Path(media_dir), max_pixels, min_pixels,
                       family, processor=processor, placeholder=processor.image_token)
        token = {name: tokenizer.convert_ids_to_tokens(getattr(config, getattr(family, f"{name}_token_field")))
                 for name in ("start", "end")}
        processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        return cls(processor, image, image_id, token["start"], token["end"], Path(media_dir), max_pixels, min_pixels,
                   family, placeholder=image)

    @classmethod
    def for_data(cls, model_dir: Path, tokenizer, data, store_dir: Path | None = None) -> MediaTokens:
        """From the `data` config group: media_dir (default dataset_dir), the image pixel budget and
        the video keys; `store_dir`: the stage's media store."""
        media = cls.load(model_dir, tokenizer, Path(data.media_dir or data.dataset_dir), data.image_max_pixels,
                         data.image_min_pixels)
        media.store_dir = store_dir
        media.enable_video(model_dir, tokenizer, VideoBudget.from_data(data))
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
        plugins: Qwen-VL start, one image token, end; the others the processor's image token)."""
        if self.family.expansion == "grid":
            return f"{self.start_token}{self.placeholder}{self.end_token}"
        return "" if self.family.prefix_images else self.placeholder

    def image_text(self, ref: dict) -> str:
        """The text one image's placeholder becomes: Qwen-VL its count of image tokens; other
        families what their processor writes for it (LLaVA-NeXT's tiles, Gemma 3's start / end
        and blank lines, Idefics3's tile grid)."""
        if self.family.expansion == "grid":
            return self.image_token * self.image_tokens(ref)
        if ref["sha256"] not in self.texts:
            inputs = self.image_processor([self.load_image(ref)], **dict(self.family.image_kwargs))
            self.texts[ref["sha256"]] = self.processor.replace_image_token(inputs, 0)
        return self.texts[ref["sha256"]]

    def expand(self, turns: list[list], images: list[dict]) -> list[list]:
        """Every placeholder in the turns' texts (one per image, in order) becomes that image's text;
        the texts are tokenized as before (the image tokens are special, so they split the text
        where they stand, and Gemma 3's blank lines tokenize with their neighbours as in LLaMA-Factory)."""
        if self.family.prefix_images:  # PaliGemma: the images' tokens open the sequence
            if any(isinstance(e, str) and self.placeholder in e for turn in turns for e in turn):
                raise TunepipeError(f"the chat template wrote image tokens {self.placeholder!r} into the text; "
                                    "PaliGemma takes its images in front of the whole sequence",
                                    hint="set data.template: paligemma")
            prefix = [self.image_token_id] * sum(self.image_tokens(ref) for ref in images)
            return [[*prefix, *turns[0]], *turns[1:]]
        texts = iter([self.image_text(ref) for ref in images])
        out, seen = [], 0
        for turn in turns:
            elements = []
            for element in turn:
                if not isinstance(element, str) or self.placeholder not in element:
                    elements.append(element)
                    continue
                pieces = element.split(self.placeholder)
                text = pieces[0]
                for piece in pieces[1:]:
                    image = next(texts, None)
                    if image is None:
                        seen = len(images) + 1  # more placeholders than images
                        break
                    text += image + piece
                    seen += 1
                elements.append(text)
            out.append(elements)
        if seen != len(images):
            raise TunepipeError(f"the chat template rendered {seen} image placeholder(s) {self.placeholder!r} for "
                                f"{len(images)} image(s)",
                                hint="set data.template to the family's template (qwen2_vl for Qwen2-VL, "
                                     "qwen3_vl for Qwen3-VL, llava, llava_next, gemma3)")
        return out

    def mask(self, input_ids: list[int], labels: list[int]) -> list[int]:
        """Labels with every image / video token ignored: media are input, never a prediction target."""
        media = {self.image_token_id, self.video_token_id} - {None}
        return [-100 if token in media else label for token, label in zip(input_ids, labels)]

    # -- the pixels ---------------------------------------------------------------------------
    def image_tokens(self, ref: dict) -> int:
        """How many image tokens the processor turns the image into (Qwen-VL: from its size, no pixels
        decoded; other families: counted in the processor's text for it)."""
        if self.family.expansion != "grid":
            return self.image_text(ref).count(self.image_token)
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
        return self.image_processor([self.load_image(ref) for ref in images], return_tensors="pt",
                                    **dict(self.family.image_kwargs))

    def model_inputs(self, input_ids, media_column: list[str | None]) -> dict:
        """The image inputs of a batch (`input_ids` [rows, width], each row's `media` JSON): the family's
        pixel keys (Qwen-VL pixel_values, image_grid_thw) and type ids (1 on image tokens, 0 on text:
        what Qwen-VL computes its 3-D rotary positions from, Gemma 3 its bidirectional image
        attention); empty when the rows hold no image."""
        images = [ref for media in media_column if media for ref in json.loads(media)["images"]]
        if not images:
            return {}
        inputs = self.pixel_inputs(images)
        out = {key: inputs[key] for key in self.family.pixel_keys}
        if self.family.type_ids_key:
            images = (input_ids == self.image_token_id).long()
            out[self.family.type_ids_key] = 1 - images if self.family.prefix_images else images
        return out

    def load_image(self, ref: dict):
        from PIL import Image

        self.verify(ref)
        with Image.open(self.file(ref)) as image:
            width, height = regularized_size(image.width, image.height, self.max_pixels, self.min_pixels,
                                             self.family.min_side)
            image = image.resize((width, height)) if (width, height) != image.size else image.copy()
        return image if image.mode == "RGB" else image.convert("RGB")


    # -- videos (the Qwen-VL families: data/video.py) ------------------------------------------
    def enable_video(self, model_dir: Path, tokenizer, budget: VideoBudget) -> None:
        """Take videos when the model's family does (video.VIDEO_FAMILIES): its video token and its
        video processor's settings, under LLaMA-Factory's video keys."""
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        family = VIDEO_FAMILIES.get(config.get("model_type"))
        if family is None or config.get("video_token_id") is None:
            return
        self.video_family, self.video_budget = family, budget
        self.video_token_id = config["video_token_id"]
        self.video_token = tokenizer.convert_ids_to_tokens(self.video_token_id)
        self.video = VideoProcessing.load(model_dir, self.image_processor, family.defaults, family.timestamps)

    def video_marker(self) -> str:
        """What one `<video>` becomes in a named template's text before expansion (LLaMA-Factory's
        Qwen-VL plugins: start, one video token, end; the models' own templates write the same)."""
        return f"{self.start_token}{self.video_token}{self.end_token}"

    def video_elements(self, ref: dict) -> list:
        """What one video's marker becomes: start, its video token ids, end (Qwen2-VL, Qwen2.5-VL);
        Qwen3-VL: for each temporal patch "<t seconds>" (one decimal), start, that patch's ids, end
        (LLaMA-Factory's Qwen3VLPlugin, as transformers' Qwen3VLProcessor writes it)."""
        if not self.video_family.timestamps:
            return [self.start_token, *[self.video_token_id] * self.video_tokens(ref), self.end_token]
        clip = self.load_clip(ref)
        per_patch = self.video.frame_tokens(len(clip.frames), *clip.frames[0].size)
        out = []
        for seconds in self.video.timestamps(clip):
            out += [f"<{seconds:.1f} seconds>{self.start_token}", *[self.video_token_id] * per_patch, self.end_token]
        return out

    def expand_videos(self, turns: list[list], videos: list[dict]) -> list[list]:
        """Every video marker in the turns' texts (one per video, in order) becomes that video's
        elements; the texts around them join the texts next to them (tokenized as one, as
        LLaMA-Factory tokenizes the whole message; the video ids are special and split it anyway)."""
        marker, pending, seen = self.video_marker(), iter(videos), 0
        out = []
        for turn in turns:
            elements = []
            for element in turn:
                pieces = element.split(marker) if isinstance(element, str) else [element]
                for k, piece in enumerate(pieces):
                    ref = next(pending, None) if k else None
                    seen += bool(k)
                    if k:  # more markers than videos: counted, left as text (the error below)
                        elements += self.video_elements(ref) if ref is not None else [marker]
                    elements.append(piece)
            out.append(joined_texts(elements))
        if seen != len(videos) or any(isinstance(e, str) and self.video_token in e for turn in out for e in turn):
            raise TunepipeError(f"the chat template rendered {seen} video marker(s) {marker!r} for "
                                f"{len(videos)} video(s)", hint="set data.template to the family's template "
                                                                "(qwen2_vl for Qwen2-VL, qwen3_vl for Qwen3-VL)")
        return out

    def video_tokens(self, ref: dict) -> int:
        """How many tokens the video becomes: from the frames the collator will feed (decoded once
        per file: a stream's frame count in its header can be wrong, the decoded frames cannot)."""
        if ref["sha256"] not in self.counts:
            clip = self.load_clip(ref)
            self.counts[ref["sha256"]] = self.video.tokens(len(clip.frames), *clip.frames[0].size)
        return self.counts[ref["sha256"]]

    def load_clip(self, ref: dict):
        if self.video is None:
            raise TunepipeError(f"{ref['path']}: this vision-language model takes no video",
                                hint=f"videos train on the families {', '.join(sorted(VIDEO_FAMILIES))}")
        self.verify(ref)
        budget, min_side = self.video_budget, self.family.min_side
        return read_clip(self.file(ref), budget, lambda width, height: regularized_size(
            width, height, budget.max_pixels, budget.min_pixels, min_side))

    def video_inputs(self, videos: list[dict]) -> dict:
        """pixel_values_videos, video_grid_thw (and Qwen2.5-VL's second_per_grid_ts) for a batch's videos."""
        import torch

        clips = [self.load_clip(ref) for ref in videos]
        inputs = self.video.pixels(clips)
        if self.video_family.seconds_per_grid:  # LLaMA-Factory: temporal_patch_size / the sampled frame rate
            inputs["second_per_grid_ts"] = torch.tensor([self.video.temporal_patch_size / clip.fps for clip in clips])
        return inputs

    def batch_inputs(self, input_ids, media_column: list[str | None]) -> dict:
        """`model_inputs` (the images) plus the videos' inputs, with mm_token_type_ids 2 on video tokens
        (Qwen-VL's 3-D rotary positions for video)."""
        import torch

        out = self.model_inputs(input_ids, media_column)
        videos = [ref for media in media_column if media for ref in json.loads(media).get("videos", [])]
        if videos:
            out.update(self.video_inputs(videos))
            types = out.get("mm_token_type_ids", torch.zeros_like(input_ids))
            out["mm_token_type_ids"] = types + 2 * (input_ids == self.video_token_id).long()
        return out


def joined_texts(elements: list) -> list:
    """Adjacent texts of a turn as one text (token ids kept as they are)."""
    out = []
    for element in elements:
        if isinstance(element, str) and out and isinstance(out[-1], str):
            out[-1] += element
        else:
            out.append(element)
    return out


def regularized_size(width: int, height: int, max_pixels: int, min_pixels: int, min_side: int) -> tuple[int, int]:
    """The size LLaMA-Factory resizes an image to before the processor: into the pixel budget
    (aspect kept, sides truncated to ints), at least `min_side` a side, aspect ratio at most 200."""
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if not min_side:  # LLaMA-Factory's plugins other than Qwen-VL's stop here
        return width, height
    if min(width, height) < min_side:
        width, height = max(width, min_side), max(height, min_side)
    if width / height > 200:
        width = height * 180
    if height / width > 200:
        height = width * 180
    return width, height


def image_parts(content: str) -> list[dict] | str:
    """A message's text as the content parts chat templates read (`{"type": "image"}` where each
    `<image>` was, `{"type": "video"}` where each `<video>` was), or the text itself when it has none."""
    markers = {PLACEHOLDERS["images"]: "image", PLACEHOLDERS["videos"]: "video"}
    if not any(marker in content for marker in markers):
        return content
    parts, text = [], content
    while text:
        index, marker = min(((text.find(m), m) for m in markers if m in text), default=(len(text), None))
        if index:
            parts.append({"type": "text", "text": text[:index]})
        if marker is None:
            break
        parts.append({"type": markers[marker]})
        text = text[index + len(marker):]
    return parts
