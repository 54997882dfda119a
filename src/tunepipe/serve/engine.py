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

Several adapters (PEFT's multi-adapter model, one `adapter_name` per served model id): the
active rows are kept in one `Batch` per adapter, and each step runs one forward per group
with that group's adapter set (`set_adapter`). A forward never carries rows of two adapters:
PEFT applies the active adapter to the whole batch, so mixing would give one client
another adapter's answer. Groups take turns, so every client keeps streaming.
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
    """One answer to generate: prompt ids in, token ids out through `emit(token or None, reason)`.

    `adapter`: the PEFT adapter name its forwards run with (None: the model as loaded)."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[int | None, str | None], None]
    adapter: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    generator: object = None

    def cancel(self) -> None:
        """Stop generating (the client went away, or a stop string was seen); the slot is freed."""
        self.cancelled.set()


@dataclass
class Batch:
    """The running rows of one adapter and their shared cache."""

    rows: list[Request] = field(default_factory=list)
    cache: object = None
    mask: object = None  # [rows, cached length]: 1 for real tokens, 0 for left padding
    last: object = None  # [rows, 1]: each row's newest token, the next step's input


class Engine:
    """Owns the model; `submit` from any thread, answers come back through each request's `emit`."""

    def __init__(self, model, stop_ids: list[int], pad_id: int, max_batch: int = 16):
        self.model = model
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.batches: dict[str | None, Batch] = {}
        self.active: str | None = None  # the adapter set on the model now
        self.steps = 0  # forward passes so far (decode steps with > 1 row show batching happened)
        self.max_rows = 0  # the most rows one decode step carried
        self.forwards: list[tuple[str | None, frozenset]] = []  # (adapter, adapters of its rows), last 256
        self.cache_key = cache_argument(model)
        self.thread = threading.Thread(target=self._run, name="tunepipe-engine", daemon=True)
        self.thread.start()

    @property
    def rows(self) -> list[Request]:
        """Every active row, of every adapter."""
        return [row for batch in self.batches.values() for row in batch.rows]

    def submit(self, request: Request) -> Request:
        import torch

        request.generator = torch.Generator(device="cpu").manual_seed(request.sampling.seed)
        self.pending.put(request)
        return request

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what is running and stop the thread."""
        for row in self.rows:
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
                    for adapter in dict.fromkeys(r.adapter for r in arrived):
                        self._prefill(adapter, [r for r in arrived if r.adapter == adapter])
                    for adapter, batch in list(self.batches.items()):
                        if batch.rows:
                            self._decode(adapter, batch)
                except Exception as exc:  # a bug or out of memory: fail these requests, keep serving
                    log.exception("generation failed")
                    for row in self.rows + arrived:
                        row.emit(None, f"error: {type(exc).__name__}")
                    self.batches = {}

    def _arrivals(self) -> list[Request] | None:
        """Requests to admit now: wait for one when idle, else take what is queued (None: shut down)."""
        arrived: list[Request] = []
        running = len(self.rows)
        while running + len(arrived) < self.max_batch:
            try:
                item = self.pending.get(block=not running and not arrived)
            except queue.Empty:
                break
            if item is None:
                return None
            if item.cancelled.is_set():
                item.emit(None, "cancelled")
            else:
                arrived.append(item)
        return arrived

    def _forward(self, adapter: str | None, rows: list[Request], **inputs):
        if adapter is not None and adapter != self.active:
            self.model.set_adapter(adapter)  # PEFT: swaps which LoRA weights the layers apply
            self.active = adapter
        self.forwards = self.forwards[-255:] + [(adapter, frozenset(r.adapter for r in rows))]
        return self.model(use_cache=True, **inputs)

    def _prefill(self, adapter: str | None, arrived: list[Request]) -> None:
        """Run the new prompts (left-padded together), choose their first tokens, join the batch."""
        import torch
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in arrived)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt)) + r.prompt for r in arrived])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in arrived])
        device = self.model.device
        cache = DynamicCache()
        out = self._forward(adapter, arrived, input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
                            **{self.cache_key: cache})
        batch = self.batches.setdefault(adapter, Batch())
        _join(batch, arrived, cache, mask.to(device))
        self._advance(batch, arrived, out.logits[:, -1, :], offset=len(batch.rows) - len(arrived))

    def _decode(self, adapter: str | None, batch: Batch) -> None:
        """One step for every active row of one adapter."""
        import torch

        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        out = self._forward(adapter, batch.rows, input_ids=batch.last, attention_mask=batch.mask,
                            position_ids=batch.mask.sum(-1, keepdim=True) - 1, **{self.cache_key: batch.cache})
        self.steps += 1
        self.max_rows = max(self.max_rows, len(batch.rows))
        self._advance(batch, list(batch.rows), out.logits[:, -1, :], offset=0)

    def _advance(self, batch: Batch, rows: list[Request], logits, offset: int) -> None:
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
        batch.last = last if offset == 0 else torch.cat([batch.last, last], dim=0)
        if done:
            _drop(batch, done)

    def _finish_reason(self, row: Request, token: int) -> str | None:
        if row.cancelled.is_set():
            return "cancelled"
        if token in self.stop_ids:
            return "stop"
        if len(row.tokens) + 1 >= row.sampling.max_tokens:
            return "length"
        return None


# -- a batch's cache -----------------------------------------------------------------------
def _join(batch: Batch, arrived: list[Request], cache, mask) -> None:
    """Concatenate the arrivals' cache to the running one, left-padding the shorter of the two."""
    from transformers import DynamicCache

    if not batch.rows:
        batch.rows, batch.cache, batch.mask = list(arrived), cache, mask
        return
    width = max(batch.mask.shape[1], mask.shape[1])
    layers = [(_cat_left(old_k, new_k, width), _cat_left(old_v, new_v, width))
              for (old_k, old_v), (new_k, new_v) in zip(_layers(batch.cache), _layers(cache), strict=True)]
    batch.mask = _cat_left(batch.mask, mask, width, dim=1)
    batch.cache = DynamicCache(ddp_cache_data=layers)
    batch.rows += arrived


def _drop(batch: Batch, done: list[int]) -> None:
    import torch

    keep = [i for i in range(len(batch.rows)) if i not in set(done)]
    batch.rows = [batch.rows[i] for i in keep]
    if not keep:
        batch.cache = batch.mask = batch.last = None
        return
    index = torch.tensor(keep, device=batch.mask.device)
    batch.cache.batch_select_indices(index)
    batch.mask, batch.last = batch.mask[index], batch.last[index]
    # columns that are padding in every remaining row carry nothing: cut them off
    lead = int((batch.mask.cumsum(dim=1) == 0).sum(dim=1).min())
    if lead:
        from transformers import DynamicCache

        batch.mask = batch.mask[:, lead:]
        batch.cache = DynamicCache(ddp_cache_data=[(k[:, :, lead:], v[:, :, lead:])
                                                   for k, v in _layers(batch.cache)])


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
