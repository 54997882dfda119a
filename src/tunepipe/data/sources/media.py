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

Images held inside a dataset (a parquet / hub dataset's `Image` feature, `{"bytes", "path"}`,
as LLaMA-Factory's hub datasets such as RLHF-V hold them) have no file to point at: their
bytes are decoded, hashed and written once into the media store, `data/validated/media/`,
named by their sha256 (content-addressed: a repeated image is stored once, and the same data
gives the same folder on every machine). Their reference is `{"path": "<sha256>.<ext>",
"sha256", "stored": true}`; tokenize copies the store beside the shards, so the train and
evaluate stages read images only from their declared inputs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.errors import TunepipeError

PLACEHOLDERS = {"images": "<image>", "videos": "<video>"}
MEDIA_STORE = "media"  # data/validated/media/ (and data/tokenized/media/): images held inside datasets
SUPPORTED = tuple(PLACEHOLDERS)
UNSUPPORTED = ("audios",)

Problem = tuple[list, str]  # (path into the user's row, message), as row_checks uses


@dataclass
class MediaFile:
    """What one file on disk checked out as (cached: many rows repeat an image)."""

    sha256: str | None
    error: str | None
    name: str | None = None  # an image held in the dataset: its file name in the media store


@dataclass
class MediaChecker:
    """Resolves, confines, decodes and hashes the media of rows, one dataset folder at a time."""

    media_dir: Path
    store: Path | None = None  # where images held inside the dataset are written (the media store)
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
        if isinstance(item, dict):
            return self.embedded(kind, item)
        if not isinstance(item, str) or not item:
            return None, (f"a {kind[:-1]} must be a file path (relative to media_dir, or absolute) or an image "
                          f"held in the dataset ({{bytes, path}}), got {type(item).__name__}")
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

    def embedded(self, kind: str, item: dict) -> tuple[dict | None, str | None]:
        """An image held in the dataset (datasets' Image feature undecoded: bytes and the name it
        had): decoded, hashed, written to the media store under its sha256."""
        data = item.get("bytes")
        if data is None and isinstance(item.get("path"), str) and item["path"]:
            return self.reference(kind, item["path"])  # datasets keeps a file-only image as its path
        if kind != "images" or not isinstance(data, bytes | bytearray) or self.store is None:
            return None, (f"a {kind[:-1]} held in the dataset must be an image as {{bytes, path}} "
                          f"(datasets' Image feature), got keys {sorted(item)}")
        sha256 = hashlib.sha256(data).hexdigest()
        if ("stored", sha256) not in self.checked:
            error, suffix = decode_image_bytes(bytes(data))
            self.checked[("stored", sha256)] = MediaFile(sha256, error, sha256 + suffix)
            if error is None:
                self.store.mkdir(parents=True, exist_ok=True)
                (self.store / (sha256 + suffix)).write_bytes(data)
        stored = self.checked[("stored", sha256)]
        if stored.error:
            return None, f"the image held in the dataset ({item.get('path') or 'no name'}): {stored.error}"
        self.counts[kind] += 1
        return {"path": stored.name, "sha256": sha256, "stored": True}, None

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


def decode_image_bytes(data: bytes) -> tuple[str | None, str]:
    """(None when Pillow decodes every pixel, else why not; the file suffix of its format)."""
    import io

    from PIL import Image

    error = decode_image(io.BytesIO(data))
    if error:
        return error, ""
    with Image.open(io.BytesIO(data)) as image:
        return None, f".{(image.format or 'img').lower()}"


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
