"""The bridge between the engine's thread and the server's event loop.

The engine calls each request's `emit` from its own thread; `loop.call_soon_threadsafe`
moves every token onto an asyncio queue that the request's coroutine reads, decodes
(`text.Detokenizer`) and cuts at stop strings. Leaving the reading early for any reason (a
stop string, a disconnected client, an error) cancels the request, and the engine drops its
row at its next step.
"""

from __future__ import annotations

import asyncio

from tunepipe.serve.engine import Request, Sampling
from tunepipe.serve.text import Detokenizer

__all__ = ["Sampling", "collect", "merged_pieces", "pieces"]


async def pieces(engine, tokenizer, ids: list[int], sampling: Sampling, stop: list[str]):
    """Yield (text piece, finish reason or None, completion tokens so far) until the answer ends."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()

    def emit(token, reason):
        loop.call_soon_threadsafe(tokens.put_nowait, (token, reason))

    request = engine.submit(Request(prompt=list(ids), sampling=sampling, emit=emit))
    detok = Detokenizer(tokenizer, stop)
    try:
        while True:
            token, reason = await tokens.get()
            if token is not None:
                piece = detok.add(token)
                if detok.stopped:
                    yield piece, "stop", len(detok.ids)
                    return
                if piece:
                    yield piece, None, len(detok.ids)
            if reason is not None:
                if reason.startswith("error"):
                    raise RuntimeError(f"generation failed ({reason})")
                yield detok.flush(), "length" if reason == "length" else "stop", len(detok.ids)
                return
    finally:
        request.cancel()


async def collect(engine, tokenizer, ids, sampling: Sampling, stop: list[str]) -> tuple[str, str, int]:
    """The whole answer: (text, finish reason, completion tokens)."""
    text, reason, count = "", "stop", 0
    async for piece, finish, count in pieces(engine, tokenizer, ids, sampling, stop):
        text += piece
        reason = finish or reason
    return text, reason, count


async def merged_pieces(engine, tokenizer, ids, choices: list[Sampling], stop: list[str]):
    """Several choices of one request interleaved as they come: (index, piece, reason, tokens)."""
    out: asyncio.Queue = asyncio.Queue()

    async def run(index: int, sampling: Sampling):
        try:
            async for piece, reason, count in pieces(engine, tokenizer, ids, sampling, stop):
                await out.put((index, piece, reason, count))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it in the response
            await out.put(exc)

    tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(choices)]
    try:
        finished = 0
        while finished < len(tasks):
            item = await out.get()
            if isinstance(item, Exception):
                raise item
            finished += item[2] is not None
            yield item
    finally:
        for task in tasks:
            task.cancel()
