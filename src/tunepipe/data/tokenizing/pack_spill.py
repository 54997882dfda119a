"""Packing a split that does not fit in memory: from the samples' lengths, through disk.

The unpacked samples are spilled to an Arrow file as they are tokenized, keeping only
their lengths (4 bytes each). Bins are assigned from the lengths (`packing.assign_bins`,
the same best-fit-decreasing as in memory, so the packed rows are identical). A second
pass reads the spill batch by batch and scatters every sample into a bucket file by
its bin number; each bucket holds at most `BUCKET_TOKENS` tokens of consecutive bins and
is then sorted and packed alone. Memory stays at one bucket, whatever the split size.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunepipe.data.tokenizing.packing import assign_bins

BUCKET_TOKENS = 1 << 23  # tokens per bucket: 8M tokens, 64 MB of input_ids + labels


class PackSpill:
    """Write unpacked (input_ids, labels) tables; then read them back packed, in bin order."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
        self.sink = pa.OSFile(str(folder / "samples.arrow"), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema)
        self.lengths = array("i")

    def write(self, table: pa.Table) -> None:
        table = table.select(["input_ids", "labels"])
        if table.num_rows:
            self.writer.write_table(table)
            self.lengths.extend(pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).tolist())

    def packed(self, cutoff_len: int) -> Iterator[pa.Table]:
        """Packed tables (input_ids, labels, seq_lens), bins in order, each bin's samples in order."""
        self.writer.close()
        self.sink.close()
        bins = assign_bins(self.lengths.tolist(), cutoff_len)
        count = len(self.lengths)
        bin_of, slot_of = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        for number, members in enumerate(bins):
            bin_of[members] = number
            slot_of[members] = np.arange(len(members))
        per_bucket = max(1, BUCKET_TOKENS // cutoff_len)
        buckets = -(-len(bins) // per_bucket)
        del bins
        self._scatter(bin_of, slot_of, per_bucket, buckets)
        for k in range(buckets):
            yield self._pack_bucket(k)

    def _bucket_path(self, k: int) -> Path:
        return self.folder / f"bucket-{k:05d}.arrow"

    def _scatter(self, bin_of: np.ndarray, slot_of: np.ndarray, per_bucket: int, buckets: int) -> None:
        schema = self.schema.append(pa.field("bin", pa.int64())).append(pa.field("slot", pa.int64()))
        sinks = [pa.OSFile(str(self._bucket_path(k)), "wb") for k in range(buckets)]
        writers = [pa.ipc.new_stream(sink, schema) for sink in sinks]
        with pa.OSFile(str(self.folder / "samples.arrow")) as source:
            reader = pa.ipc.open_file(source)
            start = 0
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                index = np.arange(start, start + batch.num_rows)
                start += batch.num_rows
                keys = bin_of[index] // per_bucket
                for k in np.unique(keys).tolist():
                    rows = np.flatnonzero(keys == k)
                    part = batch.take(pa.array(rows))
                    writers[k].write_batch(pa.record_batch(
                        [*part.columns, pa.array(bin_of[index[rows]]), pa.array(slot_of[index[rows]])], schema=schema))
        for writer, sink in zip(writers, sinks):
            writer.close()
            sink.close()
        (self.folder / "samples.arrow").unlink()

    def _pack_bucket(self, k: int) -> pa.Table:
        with pa.OSFile(str(self._bucket_path(k))) as source:
            table = pa.ipc.open_stream(source).read_all()
        self._bucket_path(k).unlink()
        order = np.lexsort((table["slot"].to_numpy(), table["bin"].to_numpy()))
        table = table.take(pa.array(order))
        bins = table["bin"].to_numpy()
        lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int32)
        starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])  # first sample of each bin
        sample_offsets = np.r_[starts, len(bins)].astype(np.int32)
        token_offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)[sample_offsets]

        def packed(name: str) -> pa.ListArray:
            flat = table[name].combine_chunks().flatten()
            return pa.ListArray.from_arrays(pa.array(token_offsets), flat)

        seq_lens = pa.ListArray.from_arrays(pa.array(sample_offsets), pa.array(lengths))
        return pa.table({"input_ids": packed("input_ids"), "labels": packed("labels"), "seq_lens": seq_lens})
