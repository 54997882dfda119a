"""Packing samples into cutoff_len rows, and cutting pretraining text into blocks.

A packed row stores `seq_lens`, the lengths of the samples it holds, in order: position
ids restart at each sample and attention stays inside each sample (the train stage's
collator turns seq_lens into position ids / varlen attention), so packing changes
throughput, never what the model learns. Bins are filled best-fit-decreasing, which is
deterministic and wastes few slots.
"""

from __future__ import annotations

import bisect

from tunepipe.data.tokenizing.encoding import IGNORE


def pack(input_ids: list[list[int]], labels: list[list[int]], cutoff_len: int) -> dict[str, list]:
    """Samples (each at most cutoff_len long) -> packed rows with input_ids, labels, seq_lens."""
    bins = assign_bins([len(ids) for ids in input_ids], cutoff_len)
    columns: dict[str, list] = {"input_ids": [], "labels": [], "seq_lens": []}
    for members in bins:
        row_ids, row_labels = [], []
        for i in members:
            row_ids += input_ids[i]
            row_labels += labels[i]
        columns["input_ids"].append(row_ids)
        columns["labels"].append(row_labels)
        columns["seq_lens"].append([len(input_ids[i]) for i in members])
    return columns


def assign_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest samples first, each into the fullest bin it fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free slots, bin number), sorted
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            bins.append([i])
            bin_no = len(bins) - 1
            left = capacity - need
        else:
            left, bin_no = free.pop(at)
            bins[bin_no].append(i)
            left -= need
        if left > 0:
            bisect.insort(free, (left, bin_no))
    return bins


def unpack(row: dict) -> list[tuple[list[int], list[int]]]:
    """A packed row back into its samples (input_ids, labels)."""
    samples, start = [], 0
    for length in row["seq_lens"]:
        samples.append((row["input_ids"][start:start + length], row["labels"][start:start + length]))
        start += length
    return samples


def pretrain_blocks(documents: list[list[int]], cutoff_len: int, with_seq_lens: bool) -> dict[str, list]:
    """Documents (each ending with EOS) concatenated and cut into cutoff_len blocks; the last
    block keeps the remainder. With `with_seq_lens` each block also records where its
    documents start and end, so attention can stay inside each document."""
    cutter = BlockCutter(cutoff_len, with_seq_lens)
    columns = cutter.feed(documents)
    for name, values in cutter.finish().items():
        columns[name] += values
    return columns


class BlockCutter:
    """`pretrain_blocks` a chunk of documents at a time: the unfinished block carries over."""

    def __init__(self, cutoff_len: int, with_seq_lens: bool):
        self.cutoff_len, self.with_seq_lens = cutoff_len, with_seq_lens
        self.block: list[int] = []
        self.pieces: list[int] = []

    def _columns(self) -> dict[str, list]:
        return {"input_ids": [], "labels": [], **({"seq_lens": []} if self.with_seq_lens else {})}

    def feed(self, documents) -> dict[str, list]:
        """The blocks these documents complete."""
        columns = self._columns()
        cutoff_len = self.cutoff_len
        for doc in documents:
            start = 0
            while start < len(doc):
                take = min(cutoff_len - len(self.block), len(doc) - start)
                self.block += doc[start:start + take]
                self.pieces.append(take)
                start += take
                if len(self.block) == cutoff_len:
                    _emit(columns, self.block, self.pieces, self.with_seq_lens)
                    self.block, self.pieces = [], []
        return columns

    def finish(self) -> dict[str, list]:
        """The last, shorter block (if any)."""
        columns = self._columns()
        if self.block:
            _emit(columns, self.block, self.pieces, self.with_seq_lens)
            self.block, self.pieces = [], []
        return columns


def _emit(columns: dict, block: list[int], pieces: list[int], with_seq_lens: bool) -> None:
    labels = list(block)
    if with_seq_lens:
        start = 0
        for length in pieces:  # nothing inside a piece predicts its first token
            labels[start] = IGNORE
            start += length
        columns["seq_lens"].append(list(pieces))
    labels[0] = IGNORE
    columns["input_ids"].append(block)
    columns["labels"].append(labels)
