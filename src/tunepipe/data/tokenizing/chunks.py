"""Tokenizing a plan of validated rows chunk by chunk, on every core.

A plan (see `mixing`) is cut into chunks of `preprocessing_batch_size` rows. Each chunk
is read from `data/validated/*.jsonl` by byte offset, encoded with the per-row
encoding functions (`encoding.encode_conversations` / `encode_preference`, or the fast
tokenizer for pretraining text) and returned as an Arrow table (or, for pretraining,
the documents' token ids) with the chunk's statistics. With several workers the chunks
run in forked processes, at most a few chunks ahead of the consumer, and come back in
plan order, so the output never depends on the worker count or the chunk size and
memory stays bounded by a handful of chunks.

Why hand-written: `datasets.map(num_proc=...)` needs the whole dataset materialised
first and writes a cache file per worker; here nothing is held but the chunks in
flight. Forked workers inherit the tokenizer, the chat format and the byte offsets
instead of pickling them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tunepipe.config import DataConfig
from tunepipe.data.tokenizing.batching import BatchEncoder
from tunepipe.data.tokenizing.encoding import Stats, encode_conversations, encode_preference, encode_prompts
from tunepipe.data.tokenizing.shards import to_table

AHEAD = 2  # chunks in flight per worker
RECYCLE = 200  # chunks a worker process encodes before a fresh fork replaces it


@dataclass
class Job:
    """What every chunk of one split needs; forked workers inherit it."""

    kind: str
    names: list[str]  # the columns of the tables returned
    eval_columns: bool
    data: DataConfig
    fmt: object  # templates.ChatFormat, or None for pretraining
    tokenizer: object
    files: list[str]  # validated .jsonl per dataset number
    offsets: list[np.ndarray]  # byte offset of every row, per dataset number


@dataclass
class ChunkResult:
    table: object  # pyarrow.Table, or for pretraining a list of documents' ids (each + EOS)
    stats: Stats = field(default_factory=Stats)


_JOB: Job | None = None  # set in the parent before forking


def read_plan_rows(job: Job, plan: np.ndarray) -> list[dict]:
    """The validated rows of a plan chunk, in plan order."""
    handles: dict[int, object] = {}
    rows = []
    try:
        for dataset, row in plan.tolist():
            handle = handles.get(dataset)
            if handle is None:
                handle = handles[dataset] = open(job.files[dataset], "rb")  # noqa: SIM115 (closed below)
            handle.seek(int(job.offsets[dataset][row]))
            rows.append(json.loads(handle.readline()))
    finally:
        for handle in handles.values():
            handle.close()
    return rows


def encode_chunk(job: Job, plan: np.ndarray) -> ChunkResult:
    rows = read_plan_rows(job, plan)
    stats = Stats()
    stats.lengths = array("i")
    if job.kind == "pretrain":
        # EOS, or a named template's document end: an id, or a text tokenized with the document
        end = job.fmt.document_end() if job.fmt else job.tokenizer.eos_token_id
        suffix, tail = (end, []) if isinstance(end, str) else ("", [end])
        documents = [ids + tail for ids in BatchEncoder(job.tokenizer)([r["text"] + suffix for r in rows])]
        stats.rows_in = len(rows)
        return ChunkResult(documents, stats)
    if job.kind == "preference":
        columns = encode_preference(rows, job.fmt, job.data, stats)
    elif job.kind == "prompt":
        columns = encode_prompts(rows, job.fmt, job.data, stats)
    else:
        columns = encode_conversations(rows, job.fmt, job.data, job.kind, eval_columns=job.eval_columns, stats=stats)
    return ChunkResult(to_table(columns, job.names), stats)


def _encode_in_worker(plan: np.ndarray) -> ChunkResult:
    return encode_chunk(_JOB, plan)


def _quiet_worker() -> None:
    # one process per core already: the Rust tokenizer's own thread pool would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def worker_count(requested: int | None) -> int:
    """data.preprocessing_num_workers, or every core this process may run on."""
    if requested:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_chunks(job: Job, plan: np.ndarray, chunk_rows: int, workers: int) -> Iterator[ChunkResult]:
    """ChunkResults in plan order; with workers > 1 in forked processes, a few chunks ahead."""
    global _JOB
    starts = range(0, len(plan), chunk_rows)
    workers = min(workers, max(1, len(starts)))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for start in starts:
            yield encode_chunk(job, plan[start:start + chunk_rows])
        return
    _JOB = job
    try:
        # workers are replaced every RECYCLE chunks: whatever a long-lived worker's heap keeps
        # (allocator fragmentation) cannot grow with the dataset
        with multiprocessing.get_context("fork").Pool(workers, initializer=_quiet_worker,
                                                      maxtasksperchild=RECYCLE) as pool:
            pending: deque = deque()
            for start in starts:
                if len(pending) >= AHEAD * workers:
                    yield pending.popleft().get()
                pending.append(pool.apply_async(_encode_in_worker, (plan[start:start + chunk_rows],)))
            while pending:
                yield pending.popleft().get()
    finally:
        _JOB = None


def merge_stats(total: Stats, part: Stats) -> None:
    """Add one chunk's statistics to the split's (lengths kept as 4-byte ints, not Python lists)."""
    for name in ("rows_in", "rows_out", "truncated", "dropped_overlong", "dropped_no_labels"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.lengths.extend(part.lengths)


def new_stats() -> Stats:
    stats = Stats()
    stats.lengths = array("i")
    return stats
