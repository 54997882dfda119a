"""Images and videos in rows: LLaMA-Factory's `images` / `videos` columns, checked at validate.

A row names its media as a list of paths (or one path), relative to `data.media_dir`
(default: `data.dataset_dir`) or absolute; either way the file must lie inside that
folder (a row cannot read /etc/passwd into a training set). Each file must exist and
decode: Pillow loads every pixel of an image, PyAV decodes a video's first frame.
The text says where each item goes with `<image>` / `<video>` placeholders, one per
item (LLaMA-Factory's rule); a row with media but no placeholder of that kind gets
them prepended to its first user turn (as LLaMA-Factory's chat engines do), and the
report counts those rows. Any other mismatch is an error on that row.

The canonical row keeps `images` / `videos` as `[{"path", "sha256"}]`, the path relative
to media_dir: the validated rows change when an image's bytes do, so DVC re-runs
every stage downstream of a changed image. Audio is not supported (a clear error).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.errors import TunepipeError

PLACEHOLDERS = {"images": "<image>", "videos": "<video>"}
SUPPORTED = tuple(PLACEHOLDERS)
UNSUPPORTED = ("audios",)

Problem = tuple[list, str]  # (path into the user's row, message), as row_checks uses


@dataclass
class MediaFile:
    """What one file on disk checked out as (cached: many rows repeat an image)."""

    sha256: str | None
    error: str | None


@dataclass
class MediaChecker:
    """Resolves, confines, decodes and hashes the media of rows, one dataset folder at a time."""

    media_dir: Path
    checked: dict[tuple, MediaFile] = field(default_factory=dict)
    prepended: int = 0  # rows that had their placeholders prepended
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SUPPORTED, 0))

    def __post_init__(self):
        self.root = Path(self.media_dir).resolve()

    def attach(self, row: dict, data: dict, columns: dict[str, str], text_path: list) -> list[Problem]:
        """Check the raw row's media and put their references into the canonical `row`
        (placeholders prepended where it has none); returns the problems (paths in logical names)."""
        media, problems = {}, []
        for kind in SUPPORTED:
            if kind not in columns:
                continue
            value = data.get(columns[kind])
            items = [] if value is None else value if isinstance(value, list) else [value]
            refs = []
            for index, item in enumerate(items):
                ref, problem = self.reference(kind, item)
                if problem:
                    problems.append(([kind, index] if isinstance(value, list) else [kind], problem))
                else:
                    refs.append(ref)
            media[kind] = refs
        if problems:
            return problems
        prepended = False
        for kind, refs in media.items():
            problem, added = placeholders(row, kind, len(refs))
            if problem:
                problems.append((text_path, problem))
            prepended |= added
            row[kind] = refs
        self.prepended += prepended and not problems
        return problems

    def reference(self, kind: str, item) -> tuple[dict | None, str | None]:
        if not isinstance(item, str) or not item:
            shown = "an image held in the dataset" if isinstance(item, dict) else type(item).__name__
            return None, (f"a {kind[:-1]} must be a file path (relative to media_dir, or absolute), got {shown}; "
                          "images held inside hub datasets are not supported yet")
        path = Path(item) if os.path.isabs(item) else self.root / item
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            return None, f"{item!r} lies outside media_dir {self.root}: media files must be inside it"
        if not resolved.is_file():
            return None, f"{kind[:-1]} file {item!r} not found (looked for {resolved})"
        checked = self.check_file(kind, resolved)
        if checked.error:
            return None, f"{item!r}: {checked.error}"
        self.counts[kind] += 1
        return {"path": resolved.relative_to(self.root).as_posix(), "sha256": checked.sha256}, None

    def check_file(self, kind: str, path: Path) -> MediaFile:
        stat = path.stat()
        key = (kind, str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self.checked:
            error = decode_image(path) if kind == "images" else decode_video(path)
            self.checked[key] = MediaFile(None if error else file_sha256(path), error)
        return self.checked[key]


def placeholders(row: dict, kind: str, count: int) -> tuple[str | None, bool]:
    """Check the placeholders of one kind in the canonical row's messages against `count` items;
    a row with none gets them prepended to its first user turn. Returns (problem, prepended)."""
    marker = PLACEHOLDERS[kind]
    found = sum(turn["content"].count(marker) for turn in row["messages"])
    if found == count:
        return None, False
    if found == 0:
        first_user = next(turn for turn in row["messages"] if turn["role"] == "user")
        first_user["content"] = marker * count + first_user["content"]
        return None, True
    return (f"the text has {found} {marker} placeholder{'s' * (found != 1)} but the row names {count} {kind}: "
            f"each {kind[:-1]} needs exactly one {marker} where it goes"), False


def decode_image(path: Path) -> str | None:
    """None when Pillow decodes every pixel, else why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a readable image ({type(exc).__name__}: {exc})"
    return None


def decode_video(path: Path) -> str | None:
    """None when PyAV finds a video stream and decodes its first frame, else why not."""
    try:
        import av
    except ImportError:
        raise TunepipeError("videos need PyAV to decode them", hint="pip install av") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "holds no video stream"
            next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, OSError, ValueError) as exc:
        return f"not a readable video ({type(exc).__name__}: {exc})"
    return None


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def refuse_unsupported(name: str, columns: dict) -> None:
    """Audio (and any other media) is refused by name, never silently ignored."""
    odd = [c for c in UNSUPPORTED if c in columns]
    if odd:
        raise TunepipeError(f"dataset {name!r}: media columns {odd} are not supported",
                            hint=f"tunepipe reads {' and '.join(SUPPORTED)} (LLaMA-Factory's <image> / <video>); "
                                 "drop the audio column from dataset_info.json")
