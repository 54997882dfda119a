"""Videos for the Qwen-VL families: frames sampled with PyAV, patched by the PIL image processor.

Frames (LLaMA-Factory 0.9.5's Qwen-VL rule, with its keys and defaults): a video of
`duration` seconds and `total` frames gives `min(total, video_maxlen, max(1, floor(duration
* video_fps)))` frames at evenly spaced indices (`linspace(0, total - 1, n)` truncated);
a stream that does not know its frame count gives its first `video_maxlen` frames. An
odd count repeats the last frame, and each frame is scaled into `[video_min_pixels,
video_max_pixels]` like an image (the caller passes vision.regularized_size).

Pixels: transformers' Qwen2-VL video processor needs torchvision, which cannot load beside
the CPU torch here (docs/architecture.md, "Vision-language models"), so tunepipe runs the
video processor's own settings (read by transformers' loader: the nested
processor_config.json, else video_preprocessor_config.json, else preprocessor_config.json;
the class defaults below for keys none of them set) through the family's PIL image
processor, frame by frame, then lays each group of `temporal_patch_size` frames into one
temporal patch exactly as the video processor's `patchify` does. The only difference left
is the resize interpolation (PIL's bicubic, torchvision's bicubic): tests/test_vlm_video.py
runs transformers' video processor code on frames that need no resize and gets the same
tensors. The same code runs on a GPU machine, so a run there gives the same tokens.

Qwen3-VL (LLaMA-Factory 0.9.5's qwen3_vl plugin): the same frames, but the frame size is
transformers' Qwen3-VL smart_resize, whose pixel bound covers all the frames together
(`frame_size`: tunepipe resizes there, the image processor then keeps the size), and the
text gives each temporal patch its time (`timestamps`; vision.MediaTokens.video_elements).
tests/test_vlm_video_qwen3.py checks both against transformers' Qwen3VLVideoProcessor /
Qwen3VLProcessor and LLaMA-Factory's own rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunepipe.errors import TunepipeError

# Qwen2VLVideoProcessor's class defaults (transformers 5.x), for keys a model's config omits
QWEN2_VL_VIDEO_DEFAULTS = {
    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, "patch_size": 14,
    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
}
PASSED_KEYS = tuple(QWEN2_VL_VIDEO_DEFAULTS)  # what the image processor call takes from the video config
# Qwen3VLVideoProcessor's class defaults (transformers 5.x): patch 16, ImageNet-standard mean / std
QWEN3_VL_VIDEO_DEFAULTS = {**QWEN2_VL_VIDEO_DEFAULTS, "size": {"shortest_edge": 128 * 32 * 32,
                                                               "longest_edge": 32 * 32 * 768},
                           "patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@dataclass(frozen=True)
class VideoFamily:
    """What differs between the families tunepipe feeds videos to."""

    defaults: dict  # the video processor's class defaults (for keys the model's config omits)
    seconds_per_grid: bool = False  # the 3-D positions read each video's second_per_grid_ts (Qwen2.5-VL)
    # Qwen3-VL: the text says when each temporal patch is ("<t seconds>" before its own start / tokens /
    # end), and a frame's size comes from the whole video's pixels (its resize counts the frames)
    timestamps: bool = False


# config.json model_type -> its video handling (Qwen2.5-VL's processor uses Qwen2-VL's video processor)
VIDEO_FAMILIES = {"qwen2_vl": VideoFamily(QWEN2_VL_VIDEO_DEFAULTS),
                  "qwen2_5_vl": VideoFamily(QWEN2_VL_VIDEO_DEFAULTS, seconds_per_grid=True),
                  "qwen3_vl": VideoFamily(QWEN3_VL_VIDEO_DEFAULTS, timestamps=True)}


@dataclass(frozen=True)
class VideoBudget:
    """LLaMA-Factory's video keys: frames per second, at most this many frames, pixels per frame."""

    fps: float
    maxlen: int
    max_pixels: int
    min_pixels: int

    @classmethod
    def from_data(cls, data) -> VideoBudget:
        """From the `data` config group's video_fps / video_maxlen / video_max_pixels / video_min_pixels."""
        return cls(data.video_fps, data.video_maxlen, data.video_max_pixels, data.video_min_pixels)


@dataclass
class Clip:
    """The frames a video gives (PIL images, regularized) and its sampled frame rate."""

    frames: list
    fps: float  # sampled frames per second of video (Qwen2.5-VL's second_per_grid_ts reads it)
    # when each sampled frame is (Qwen3-VL's text): its index / the stream's average frame rate
    seconds: list[float] = field(default_factory=list)


def sample_indices(total: int, duration: float | None, budget: VideoBudget) -> list[int]:
    """Which frames a video gives (LLaMA-Factory's rule: see the module docstring)."""
    if total == 0 or duration is None:  # unknown frame count or length: the first video_maxlen frames
        return list(range(budget.maxlen))
    count = min(total, budget.maxlen, max(1, math.floor(duration * budget.fps)))
    return np.linspace(0, total - 1, count).astype(np.int32).tolist()


def read_clip(path: Path, budget: VideoBudget, frame_size: Callable[[int, int], tuple[int, int]]) -> Clip:
    """Decode the sampled frames of the video at `path` (PyAV), each resized to `frame_size(width, height)`."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base) if stream.duration is not None else None
        wanted = set(sample_indices(stream.frames, duration, budget))
        rate = float(stream.average_rate) if stream.average_rate else budget.fps
        decoded = [(k, frame.to_image()) for k, frame in enumerate(container.decode(stream)) if k in wanted]
    frames, seconds = [image for _, image in decoded], [k / rate for k, _ in decoded]
    if not frames:
        raise TunepipeError(f"{path}: no frame decoded", hint="re-encode the video (ffmpeg -i in.mp4 out.mp4)")
    # LLaMA-Factory: the sampled count over the whole length (or video_fps when the length is unknown)
    fps = len(wanted) / duration if duration else budget.fps
    if len(frames) % 2:
        frames.append(frames[-1])
    out = []
    for frame in frames:
        size = frame_size(frame.width, frame.height)
        frame = frame.resize(size) if size != frame.size else frame
        out.append(frame if frame.mode == "RGB" else frame.convert("RGB"))
    return Clip(out, fps, seconds)


@dataclass
class VideoProcessing:
    """A model's video processor settings, applied through its PIL image processor (module docstring)."""

    image_processor: object
    settings: dict  # PASSED_KEYS -> value, as the model's video processor would use them
    temporal_resize: bool = False  # Qwen3-VL: the frame size comes from the whole video (frame_size)

    @classmethod
    def load(cls, model_dir: Path, image_processor, defaults: dict, temporal_resize: bool = False) -> VideoProcessing:
        from transformers.video_processing_utils import BaseVideoProcessor

        try:  # transformers' own lookup of the video processor config (no torchvision needed to read it)
            config, _ = BaseVideoProcessor.get_video_processor_dict(str(model_dir), local_files_only=True)
        except OSError:
            config = {}
        settings = {**defaults, **{key: config[key] for key in PASSED_KEYS if key in config}}
        size = dict(settings["size"])
        if config.get("min_pixels") is not None:  # the video processor's legacy keys win over size, as in its __init__
            size["shortest_edge"] = config["min_pixels"]
        if config.get("max_pixels") is not None:
            size["longest_edge"] = config["max_pixels"]
        if config.get("cap_pixels_per_frame"):
            raise TunepipeError(f"{model_dir}: the video processor sets cap_pixels_per_frame, which tunepipe "
                                "does not apply", hint="remove it from the video processor config")
        return cls(image_processor, {**settings, "size": size}, temporal_resize)

    @property
    def temporal_patch_size(self) -> int:
        return self.settings["temporal_patch_size"]

    @property
    def merge_size(self) -> int:
        return self.settings["merge_size"]

    def frame_size(self, frames: int, width: int, height: int) -> tuple[int, int]:
        """Qwen3-VL: (width, height) its video processor resizes `frames` frames of width x height to:
        transformers' own smart_resize, which bounds the pixels of all the frames together."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        size, patch = self.settings["size"], self.settings["patch_size"]
        h, w = smart_resize(frames, height, width, temporal_factor=self.temporal_patch_size,
                            factor=patch * self.merge_size, min_pixels=size["shortest_edge"],
                            max_pixels=size["longest_edge"])
        return w, h

    def frame_tokens(self, frames: int, width: int, height: int) -> int:
        """Tokens of one temporal patch of a video of `frames` frames of width x height (regularized)."""
        if self.temporal_resize:
            width, height = self.frame_size(frames, width, height)
            patch = self.settings["patch_size"]
            return (width // patch) * (height // patch) // self.merge_size ** 2
        per_frame = self.image_processor.get_number_of_image_patches(
            height, width, {key: self.settings[key] for key in ("size", "patch_size", "merge_size")})
        return per_frame // self.merge_size ** 2

    def tokens(self, frames: int, width: int, height: int) -> int:
        """Video tokens for `frames` frames of width x height (already regularized): temporal
        patches x the processor's tokens per temporal patch."""
        return math.ceil(frames / self.temporal_patch_size) * self.frame_tokens(frames, width, height)

    def timestamps(self, clip: Clip) -> list[float]:
        """Seconds of each temporal patch (Qwen3-VL's text): the mean of its first and last frame's
        time, the last frame repeated up to a whole patch (transformers' Qwen3VLProcessor rule)."""
        t_size = self.temporal_patch_size
        seconds = clip.seconds + clip.seconds[-1:] * (-len(clip.seconds) % t_size)
        return [(seconds[k] + seconds[k + t_size - 1]) / 2 for k in range(0, len(seconds), t_size)]

    def pixels(self, clips: list[Clip]) -> dict:
        """pixel_values_videos [patches, C * T * P * P] and video_grid_thw [videos, 3], in the video
        processor's layout: for each temporal patch, the merge-ordered spatial patches, each holding
        channel, then the T frames, then the patch's rows and columns."""
        import torch

        values, grids = [], []
        for clip in clips:
            frames, settings = clip.frames, self.settings
            if self.temporal_resize:  # resized here to the video's size; the image processor then keeps it
                size = self.frame_size(len(frames), *frames[0].size)
                frames = [f if f.size == size else f.resize(size, settings["resample"]) for f in frames]
                settings = {**settings, "do_resize": False}
            out = self.image_processor(frames, return_tensors="np", **settings)
            grid = out["image_grid_thw"]  # one [1, h, w] per frame, all equal (one size per video)
            h, w = int(grid[0][1]), int(grid[0][2])
            t_size, patch = self.temporal_patch_size, self.settings["patch_size"]
            # each frame's patches hold its pixels repeated T times (an image is a still video): keep one
            frames = out["pixel_values"].reshape(len(clip.frames), h * w, -1, t_size, patch, patch)[:, :, :, 0]
            if pad := -len(clip.frames) % t_size:  # the video processor repeats the last frame
                frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
            groups = frames.reshape(-1, t_size, h * w, frames.shape[2], patch, patch)  # [t, T, hw, C, P, P]
            values.append(torch.from_numpy(np.ascontiguousarray(groups.transpose(0, 2, 3, 1, 4, 5)))
                          .reshape(groups.shape[0] * h * w, -1))
            grids.append([groups.shape[0], h, w])
        return {"pixel_values_videos": torch.cat(values), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
