"""The batching generation engine: one background thread steps every active request at once.

Why a hand-written step loop rather than `model.generate` per request: `generate` fixes its
batch when it starts, so a request arriving a moment later would wait for the slowest
answer of the running batch, and every row of a `generate` call shares one temperature,
top_p, seed and length limit. Here each step is one forward pass of the model over all
active rows, with transformers' own `DynamicCache` holding their keys and values:

- a request arriving while others generate is prefilled (alone, or with the others that
  arrived with it) and then joins the running batch at the next step: its cache is
  left-padded to the batch's length and concatenated along the batch dimension;
- a finished or cancelled row (a client that disconnected) leaves at once
  (`batch_select_indices`), freeing its slot;
- every row has its own sampling settings and its own seeded `torch.Generator`, so a
  seeded sampled answer does not depend on which other requests share its steps.

Left padding is exact, not approximate: padded key positions are masked out of attention
(their softmax weight is exactly 0) and position ids count only real tokens, so a row's
logits are those of the row alone up to float rounding; tests check that greedy answers
under load equal the same requests sent one at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """Decoding settings of one request: temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Request:
    """One answer to generate: prompt ids in, token ids out through `emit(token or None, reason)`."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[int | None, str | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    generator: object = None

    def cancel(self) -> None:
        """Stop generating (the client went away, or a stop string was seen); the slot is freed."""
        self.cancelled.set()


class Engine:
    """Owns the model; `submit` from any thread, answers come back through each request's `emit`."""

    def __init__(self, model, stop_ids: list[int], pad_id: int, max_batch: int = 16, adapter: str | None = None):
        self.model = model
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.rows: list[Request] = []
        self.cache = None
        self.mask = None  # [rows, cached length]: 1 for real tokens, 0 for left padding
        self.last = None  # [rows, 1]: each row's newest token, the next step's input
        self.steps = 0  # forward passes so far (decode steps with > 1 row show batching happened)
        self.max_rows = 0  # the most rows one decode step carried
        self.cache_key = cache_argument(model)
        self.thread = threading.Thread(target=self._run, name="tunepipe-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Request:
        import torch

        request.generator = torch.Generator(device="cpu").manual_seed(request.sampling.seed)
        self.pending.put(request)
        return request

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what is running and stop the thread."""
        for row in list(self.rows):
            row.cancel()
        self.pending.put(None)
        self.thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                arrived = self._arrivals()
                if arrived is None:
                    break
                try:
                    if arrived:
                        self._prefill(arrived)
                    if self.rows:
                        self._decode()
                except Exception as exc:  # a bug or out of memory: fail these requests, keep serving
                    log.exception("generation failed")
                    for row in self.rows + arrived:
                        row.emit(None, f"error: {type(exc).__name__}")
                    self.rows, self.cache = [], None

    def _arrivals(self) -> list[Request] | None:
        """Requests to admit now: wait for one when idle, else take what is queued (None: shut down)."""
        arrived: list[Request] = []
        block = not self.rows
        while len(self.rows) + len(arrived) < self.max_batch:
            try:
                item = self.pending.get(block=block and not arrived)
            except queue.Empty:
                break
            if item is None:
                return None
            if item.cancelled.is_set():
                item.emit(None, "cancelled")
            else:
                arrived.append(item)
        return arrived

    def _prefill(self, arrived: list[Request]) -> None:
        """Run the new prompts (left-padded together), choose their first tokens, join the batch."""
        import torch
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in arrived)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt)) + r.prompt for r in arrived])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in arrived])
        device = self.model.device
        cache = DynamicCache()
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
                         use_cache=True, **{self.cache_key: cache})
        self._join(arrived, cache, mask.to(device))
        self._advance(arrived, out.logits[:, -1, :], offset=len(self.rows) - len(arrived))

    def _decode(self) -> None:
        """One step for every active row."""
        import torch

        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(input_ids=self.last, attention_mask=self.mask,
                         position_ids=self.mask.sum(-1, keepdim=True) - 1,
                         use_cache=True, **{self.cache_key: self.cache})
        self.steps += 1
        self.max_rows = max(self.max_rows, len(self.rows))
        self._advance(list(self.rows), out.logits[:, -1, :], offset=0)

    def _advance(self, rows: list[Request], logits, offset: int) -> None:
        """Pick each row's next token, hand it out, drop the rows that are done."""
        import torch

        chosen = [pick_token(logits[i], row.sampling, row.generator) for i, row in enumerate(rows)]
        done = []
        for i, (row, token) in enumerate(zip(rows, chosen)):
            reason = self._finish_reason(row, token)
            if reason != "stop":  # a stop token is not part of the answer
                row.tokens.append(token)
                row.emit(token, None)
            if reason:
                row.emit(None, reason)
                done.append(offset + i)
        last = torch.tensor(chosen, device=logits.device).unsqueeze(1)
        self.last = last if offset == 0 else torch.cat([self.last, last], dim=0)
        if done:
            self._drop(done)

    def _finish_reason(self, row: Request, token: int) -> str | None:
        if row.cancelled.is_set():
            return "cancelled"
        if token in self.stop_ids:
            return "stop"
        if len(row.tokens) + 1 >= row.sampling.max_tokens:
            return "length"
        return None

    # -- the batch's cache -----------------------------------------------------------------
    def _join(self, arrived: list[Request], cache, mask) -> None:
        """Concatenate the arrivals' cache to the running one, left-padding the shorter of the two."""
        from transformers import DynamicCache

        if not self.rows:
            self.rows, self.cache, self.mask = list(arrived), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        layers = [(_cat_left(old_k, new_k, width), _cat_left(old_v, new_v, width))
                  for (old_k, old_v), (new_k, new_v) in zip(_layers(self.cache), _layers(cache), strict=True)]
        self.mask = _cat_left(self.mask, mask, width, dim=1)
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.rows += arrived

    def _drop(self, done: list[int]) -> None:
        import torch

        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        # columns that are padding in every remaining row carry nothing: cut them off
        lead = int((self.mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if lead:
            from transformers import DynamicCache

            self.mask = self.mask[:, lead:]
            self.cache = DynamicCache(ddp_cache_data=[(k[:, :, lead:], v[:, :, lead:])
                                                      for k, v in _layers(self.cache)])


def cache_argument(model) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def _layers(cache) -> list[tuple]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cat_left(old, new, width: int, dim: int = 2):
    """`old` and `new` left-padded with zeros to `width` along `dim`, stacked along the batch dim."""
    import torch

    def pad(t):
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

    return torch.cat([pad(old), pad(new)], dim=0)


def pick_token(logits, sampling: Sampling, generator) -> int:
    """Greedy at temperature 0; else temperature, then nucleus (top_p) sampling from the row's generator."""
    import torch

    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = ordered.cumsum(-1) - ordered > sampling.top_p
        ordered[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))
