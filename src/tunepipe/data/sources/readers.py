"""Read dataset files row by row, keeping where each row came from.

Every reader returns `RawRow`s carrying the file, the row index and (for line-based
files) the line number, so a bad row can be reported precisely. File-level problems
(not UTF-8, malformed JSON array, unreadable parquet) raise `TunepipeError` with the
byte offset or line and column; a malformed line of a JSON Lines file is returned as
a row with `error` set, so `on_invalid: drop` can keep it in the rejected file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunepipe.errors import TunepipeError

BATCH_ROWS = 1000  # rows per record batch read from parquet


class RawRow:
    __slots__ = ("data", "error", "file", "index", "line", "raw_text")

    def __init__(self, file: str, index: int, line: int | None, data: Any,
                 raw_text: str | None = None, error: str | None = None):
        self.file = file  # path as shown to the user
        self.index = index  # 0-based row index within the file
        self.line = line  # 1-based line number for line-based files
        self.data = data  # the parsed row (None when it could not be parsed)
        self.raw_text = raw_text  # the line itself, when it could not be parsed
        self.error = error  # parse error, when it could not be parsed

    def location(self) -> str:
        where = f"{self.file}:row {self.index}"
        return where if self.line is None else f"{where} (line {self.line})"


def read_rows(path: Path, file_type: str, shown_as: str) -> Iterator[RawRow]:
    """The file's rows one at a time, in order; memory holds one row (or one record batch)."""
    reader = {"json": read_json, "jsonl": read_jsonl, "csv": read_csv, "txt": read_txt,
              "parquet": read_parquet, "arrow": read_arrow}[file_type]
    return reader(path, shown_as)


def not_utf8(data: bytes, start: int, shown_as: str, offset: int, line: int) -> TunepipeError:
    """The error for a bad byte at `data[start]`, `offset` being where `data` starts in the file."""
    line += data.count(b"\n", 0, start)
    return TunepipeError(f"{shown_as}: not UTF-8: byte 0x{data[start]:02x} at byte offset {offset + start} "
                         f"(line {line}) cannot be decoded",
                         hint="re-encode the file as UTF-8 (e.g. iconv -t UTF-8)")


def check_utf8(path: Path, shown_as: str, block: int = 1 << 22) -> None:
    """Stream the file through an incremental UTF-8 decoder; a bad byte names its offset and line."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as handle:
        while True:
            data = handle.read(block)
            held = decoder.getstate()[0]  # an unfinished character from the previous block (no newline)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:  # its position counts from the held bytes
                raise not_utf8(held + data, exc.start, shown_as, offset - len(held), line) from None
            if not data:
                return
            offset += len(data)
            line += data.count(b"\n")


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line without its newline) for every line; split on b"\n" only
    (str.splitlines would also split on U+2028 inside JSON strings)."""
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, offset, line.removesuffix(b"\n")
            offset += len(line)


def _decoded_lines(path: Path, shown_as: str) -> Iterator[tuple[int, str]]:
    for number, offset, raw in _lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise not_utf8(raw, exc.start, shown_as, offset, number) from None
        yield number, (text.removeprefix("\ufeff") if number == 1 else text)  # tolerate a byte-order mark


def _first_char(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1].decode("ascii", errors="replace")


def read_json(path: Path, shown_as: str) -> Iterator[RawRow]:
    """A JSON array of rows, parsed incrementally (ijson); a .json file holding JSON Lines
    (as HF datasets accepts) also works."""
    if _first_char(path) != "[":
        yield from read_jsonl(path, shown_as)
        return
    import ijson

    check_utf8(path, shown_as)
    index = 0
    with open(path, "rb") as handle:
        if handle.read(3) != b"\xef\xbb\xbf":
            handle.seek(0)
        try:
            for row in ijson.items(handle, "item", use_float=True):
                yield RawRow(shown_as, index, None, row)
                index += 1
        except ijson.JSONError as exc:
            raise TunepipeError(f"{shown_as}: invalid JSON {_where(path, exc)}") from None


def _where(path: Path, exc: Exception) -> str:
    """Line and column of a malformed JSON array: the standard parser reports them, so re-parse
    with it (only on this error path, and only for files that fit comfortably in memory)."""
    if path.stat().st_size <= 1 << 28:
        try:
            json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as found:
            return f"at line {found.lineno} column {found.colno}: {found.msg}"
    return f"({str(exc).splitlines()[0]})"


def read_jsonl(path: Path, shown_as: str) -> Iterator[RawRow]:
    loads = json.loads
    index = 0
    for number, line in _decoded_lines(path, shown_as):
        if not line.strip():
            continue
        try:
            yield RawRow(shown_as, index, number, loads(line))
        except json.JSONDecodeError as exc:
            yield RawRow(shown_as, index, number, None, raw_text=line,
                         error=f"invalid JSON at line {number} column {exc.colno}: {exc.msg}")
        index += 1


def read_csv(path: Path, shown_as: str) -> Iterator[RawRow]:
    check_utf8(path, shown_as)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        start = 2  # line 1 is the header
        for i, record in enumerate(reader):
            yield RawRow(shown_as, i, start, {k: v for k, v in record.items() if k is not None})
            start = reader.line_num + 1


def read_txt(path: Path, shown_as: str) -> Iterator[RawRow]:
    """One row per non-blank line, in a `text` column (as LLaMA-Factory's text loader)."""
    index = 0
    for number, line in _decoded_lines(path, shown_as):
        line = line.rstrip("\r")
        if line.strip():
            yield RawRow(shown_as, index, number, {"text": line})
            index += 1


def read_parquet(path: Path, shown_as: str) -> Iterator[RawRow]:
    """Record batch by record batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                yield RawRow(shown_as, index, None, row)
                index += 1
    except (OSError, pa.ArrowException) as exc:
        raise TunepipeError(f"{shown_as}: cannot read parquet: {exc}") from None


def read_arrow(path: Path, shown_as: str) -> Iterator[RawRow]:
    """An Arrow IPC stream (what HF datasets writes) or file, record batch by record batch."""
    import pyarrow as pa

    index = 0
    try:
        for batch in _arrow_batches(path):
            for row in batch.to_pylist():
                yield RawRow(shown_as, index, None, row)
                index += 1
    except (OSError, pa.ArrowException) as exc:
        raise TunepipeError(f"{shown_as}: cannot read arrow: {exc}") from None


def _arrow_batches(path: Path):
    import pyarrow as pa

    with pa.OSFile(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            for i in range(file_reader.num_record_batches):
                yield file_reader.get_batch(i)
            return
        yield from reader
