"""Batch tokenization: the fast tokenizer's Rust batch call, overlapped with rendering.

Rendering chat templates is Python (one core); the Rust tokenizer encodes a batch on
every core and releases the GIL while it does. `pipelined` therefore encodes chunk k
in a worker thread while the main thread renders chunk k+1 and assembles the labels
of chunk k-1, instead of leaving the cores idle in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

CHUNK = 2048  # rows rendered and tokenized per batch call


class BatchEncoder:
    """Texts -> token ids exactly as apply_chat_template tokenizes a rendered chat
    (no special tokens added, no truncation or padding)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self.backend = None if getattr(tokenizer, "split_special_tokens", False) else backend
        if self.backend is not None:
            # set once, up front: these mutate the Rust tokenizer, which the worker thread shares
            self.backend.no_truncation()
            self.backend.no_padding()
            self._encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)

    @property
    def thread_safe(self) -> bool:
        return self.backend is not None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [encoding.ids for encoding in self._encode(texts, add_special_tokens=False)]


def chunked(rows: list, desc: str) -> Iterable[list]:
    # one chunk (what tokenize's workers hand over) gets no bar of its own: tokenize shows the split's
    with tqdm(total=len(rows), desc=desc, unit="row", disable=None if len(rows) > CHUNK else True,
              mininterval=2) as bar:
        for start in range(0, len(rows), CHUNK):
            yield rows[start:start + CHUNK]
            bar.update(min(CHUNK, len(rows) - start))


def pipelined(rows: list, desc: str, encoder: BatchEncoder, prepare: Callable, finish: Callable) -> None:
    """For each chunk: `state, texts = prepare(chunk)`, encode the texts, `finish(chunk, state, ids)`;
    encoding runs in a worker thread, overlapping the neighbouring chunks' Python work."""
    if not encoder.thread_safe:
        for chunk in chunked(rows, desc):
            state, texts = prepare(chunk)
            finish(chunk, state, encoder(texts))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        pending = None
        for chunk in chunked(rows, desc):
            state, texts = prepare(chunk)
            future = pool.submit(encoder, texts)
            if pending is not None:
                finish(pending[0], pending[1], pending[2].result())
            pending = (chunk, state, future)
        if pending is not None:
            finish(pending[0], pending[1], pending[2].result())
