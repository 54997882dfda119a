"""Writing tokenized columns to `load_from_disk`-compatible shards as they come.

`Dataset.save_to_disk` needs the whole dataset in memory (it sizes the shards from the
total); `ShardWriter` writes the same files incrementally with datasets' own
`ArrowWriter`: rows are re-batched into exactly `BATCH_ROWS`-row record batches (what
`save_to_disk` writes), so the bytes never depend on how the rows arrived (chunk size,
worker count). A shard is closed once it passes `MAX_SHARD_BYTES`, so the shard count
of a dataset over 500 MB can differ from `save_to_disk`'s even split; below that it is
one shard, byte for byte what `save_to_disk` wrote. `state.json`'s `_fingerprint` is a
hash of the shard files (datasets derives its own from the whole in-memory table).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

ID_COLUMNS = ("input_ids", "labels", "seq_lens", "prompt_ids", "chosen_input_ids", "chosen_labels",
              "rejected_input_ids", "rejected_labels")
BATCH_ROWS = 1000  # datasets.config.DEFAULT_MAX_BATCH_SIZE: the record batch size save_to_disk writes
MAX_SHARD_BYTES = 500 * 10**6  # save_to_disk's default max_shard_size, "500MB"


def int32_lists(values) -> pa.ListArray:
    """A list<int32> Arrow column from Python lists, through one flat numpy buffer: pyarrow's
    nested-list conversion walks every element as a Python object, this copies them once."""
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=len(values)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def schema_for(names: list[str]) -> pa.Schema:
    def kind(name: str) -> pa.DataType:
        if name in ID_COLUMNS:
            return pa.list_(pa.int32())
        return pa.bool_() if name == "kto_tag" else pa.string()

    return pa.schema([(name, kind(name)) for name in names])


def to_table(columns: dict[str, list], names: list[str]) -> pa.Table:
    """Python columns -> an Arrow table with the shards' schema (missing columns: no rows)."""
    schema = schema_for(names)
    arrays = [int32_lists(columns.get(f.name, [])) if f.name in ID_COLUMNS
              else pa.array(columns.get(f.name, []), type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


class ShardWriter:
    """Append Arrow tables in order; `close()` names the shards and writes datasets' JSON files."""

    def __init__(self, path: Path, names: list[str]):
        from datasets import Dataset

        self.path = path
        self.schema = schema_for(names)
        # the features and info exactly as save_to_disk derives them from a table of this schema
        self.template = Dataset(self.schema.empty_table())
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0
        self.files: list[Path] = []
        self.writer = None
        self.shard_bytes = 0
        path.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows > BATCH_ROWS:
            self._flush(BATCH_ROWS)

    def _flush(self, count: int) -> None:
        # A batch is written as a slice of a buffer that goes on into the next row, as when
        # save_to_disk slices one whole table: Arrow's IPC writer then fills the 8-byte padding
        # of a values buffer with the bytes that follow, and the file matches byte for byte.
        table = pa.concat_tables(self.pending).combine_chunks()
        head, rest = table.slice(0, count), table.slice(count)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self.writer is None or self.shard_bytes >= MAX_SHARD_BYTES:
            self._next_shard()
        self.writer.write_table(head)
        self.shard_bytes += head.nbytes
        self.rows += head.num_rows

    def _next_shard(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        if self.writer is not None:
            self.writer.finalize()
            self.writer.close()
        self.files.append(self.path / f"shard-{len(self.files):05d}.arrow")
        self.writer = ArrowWriter(features=self.template.features, path=str(self.files[-1]),
                                  embed_local_files=True)
        self.shard_bytes = 0

    def close(self) -> int:
        """Finish the last shard; return the number of rows written."""
        while self.pending_rows:
            self._flush(min(BATCH_ROWS, self.pending_rows))
        if self.writer is None:  # no rows: one empty shard, as save_to_disk writes
            self._next_shard()
        self.writer.finalize()
        self.writer.close()
        count = len(self.files)
        names = [f"data-{k:05d}-of-{count:05d}.arrow" for k in range(count)]
        digest = hashlib.sha256()
        for file, name in zip(self.files, names):
            file.rename(self.path / name)
            with open(self.path / name, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": digest.hexdigest()[:16],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        with open(self.path / "state.json", "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
        from datasets.utils.py_utils import asdict  # datasets' own: drops what save_to_disk drops

        info = asdict(self.template.info)
        with open(self.path / "dataset_info.json", "w", encoding="utf-8") as handle:
            json.dump({key: info[key] for key in sorted(info)}, handle, indent=2)
        return self.rows
