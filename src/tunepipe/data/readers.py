"""Read dataset files row by row, keeping where each row came from.

Every reader returns `RawRow`s carrying the file, the row index and (for line-based
files) the line number, so a bad row can be reported precisely. File-level problems
(not UTF-8, malformed JSON array, unreadable parquet) raise `TunepipeError` with the
byte offset or line and column; a malformed line of a JSON Lines file is returned as
a row with `error` set, so `on_invalid: drop` can keep it in the rejected file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from tunepipe.errors import TunepipeError


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


def read_rows(path: Path, file_type: str, shown_as: str) -> list[RawRow]:
    reader = {"json": read_json, "jsonl": read_jsonl, "csv": read_csv, "txt": read_txt,
              "parquet": read_parquet, "arrow": read_arrow}[file_type]
    return reader(path, shown_as)


def read_text(path: Path, shown_as: str) -> str:
    """The file as text; a non-UTF-8 file names the byte offset and line of the first bad byte."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TunepipeError(f"{shown_as}: not UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
                            f"(line {line}) cannot be decoded",
                            hint="re-encode the file as UTF-8 (e.g. iconv -t UTF-8)") from None
    return text.removeprefix("\ufeff")  # tolerate a byte-order mark


def read_json(path: Path, shown_as: str) -> list[RawRow]:
    """A JSON array of rows; a .json file holding JSON Lines (as HF datasets accepts) also works."""
    text = read_text(path, shown_as)
    if not text.lstrip().startswith("["):
        return _jsonl_rows(text, shown_as)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TunepipeError(f"{shown_as}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return [RawRow(shown_as, i, None, row) for i, row in enumerate(data)]


def read_jsonl(path: Path, shown_as: str) -> list[RawRow]:
    return _jsonl_rows(read_text(path, shown_as), shown_as)


def _jsonl_rows(text: str, shown_as: str) -> list[RawRow]:
    rows = []
    loads = json.loads
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(RawRow(shown_as, len(rows), number, loads(line)))
        except json.JSONDecodeError as exc:
            rows.append(RawRow(shown_as, len(rows), number, None, raw_text=line,
                               error=f"invalid JSON at line {number} column {exc.colno}: {exc.msg}"))
    return rows


def read_csv(path: Path, shown_as: str) -> list[RawRow]:
    reader = csv.DictReader(io.StringIO(read_text(path, shown_as), newline=""))
    rows, start = [], 2  # line 1 is the header
    for i, record in enumerate(reader):
        rows.append(RawRow(shown_as, i, start, {k: v for k, v in record.items() if k is not None}))
        start = reader.line_num + 1
    return rows


def read_txt(path: Path, shown_as: str) -> list[RawRow]:
    """One row per non-blank line, in a `text` column (as LLaMA-Factory's text loader)."""
    rows = []
    for number, line in enumerate(read_text(path, shown_as).split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            rows.append(RawRow(shown_as, len(rows), number, {"text": line}))
    return rows


def read_parquet(path: Path, shown_as: str) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise TunepipeError(f"{shown_as}: cannot read parquet: {exc}") from None
    return [RawRow(shown_as, i, None, row) for i, row in enumerate(table.to_pylist())]


def read_arrow(path: Path, shown_as: str) -> list[RawRow]:
    """An Arrow IPC stream (what HF datasets writes) or file."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise TunepipeError(f"{shown_as}: cannot read arrow: {exc}") from None
    return [RawRow(shown_as, i, None, row) for i, row in enumerate(table.to_pylist())]
