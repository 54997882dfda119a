"""The FastAPI app: `/v1/models`, `/v1/chat/completions` (plain and SSE), auth, OpenAI-shaped errors.

Each request is checked (model id, roles, context length, max_tokens) before anything reaches
the engine, so a bad request costs nothing and never disturbs the ones generating. Answers
carry no clock and no random ids: `created` is 0, ids count requests, sampling is seeded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tunepipe.errors import TunepipeError
from tunepipe.serve import generation
from tunepipe.serve.prompts import canonical_row, openai_tool_calls, parse_calls, prompt_ids
from tunepipe.serve.schemas import MAX_N, ChatRequest, error_body


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass
class Served:
    """Everything the routes need: the engine, the chat format, and the server's settings."""

    engine: object
    chat_format: object
    model_ids: list[str]
    context: int
    defaults: dict  # max_tokens, temperature (0: greedy), top_p when a request leaves them unset
    api_key: str | None = None
    tool_format: str | None = None
    seed: int = 0
    counter: itertools.count = field(default_factory=itertools.count)


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="tunepipe", docs_url=None, redoc_url=None)
    app.state.served = served
    install_errors(app)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if served.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
                return JSONResponse(error_body("invalid or missing API key (Authorization: Bearer ...)",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tunepipe"}
                                           for name in served.model_ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        number = next(served.counter)
        ids, choices = prepare(served, body, number)
        head = {"id": f"chatcmpl-{number}", "created": 0, "model": body.model}
        if body.stream:
            return StreamingResponse(stream(served, body, ids, choices, head), media_type="text/event-stream")
        return await complete(served, body, ids, choices, head, number)

    return app


def install_errors(app: FastAPI) -> None:
    def reply(status: int, body: dict) -> JSONResponse:
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return reply(exc.status, error_body(exc.message, exc.kind, exc.param, exc.code))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return reply(400, error_body(f"the request body is not valid JSON: {first.get('msg')}"))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return reply(400, error_body(f"{where}: {first.get('msg')}", param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return reply(exc.status_code, error_body(str(exc.detail), kind))


def prepare(served: Served, body: ChatRequest, number: int) -> tuple[list[int], list]:
    """The prompt ids and one `Sampling` per choice; ApiError for what cannot be served."""
    if body.model not in served.model_ids:
        raise ApiError(404, f"model {body.model!r} is not served here (GET /v1/models lists "
                       f"{', '.join(served.model_ids)})", param="model", code="model_not_found",
                       kind="not_found_error")
    try:
        ids = prompt_ids(served.chat_format, canonical_row(body.messages, body.tools))
    except TunepipeError as exc:
        raise ApiError(400, exc.message, param="messages") from None
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = requested or min(served.defaults["max_tokens"], served.context - len(ids))
    if len(ids) + max(max_tokens, 1) > served.context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: more than the "
                       f"model's context of {served.context} tokens", param="messages" if not requested
                       else "max_tokens", code="context_length_exceeded")
    temperature = served.defaults["temperature"] if body.temperature is None else body.temperature
    top_p = body.top_p if body.top_p is not None else served.defaults["top_p"]
    # unseeded requests still sample reproducibly: train.seed plus the request's number
    base_seed = served.seed + number * MAX_N if body.seed is None else body.seed
    choices = [generation.Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   seed=base_seed + i) for i in range(body.n)]
    return ids, choices


async def complete(served: Served, body: ChatRequest, ids, choices, head: dict, number: int) -> dict:
    results = await asyncio.gather(*(generation.collect(served.engine, served.chat_format.tokenizer, ids, sampling,
                                                        body.stops()) for sampling in choices))
    out, completion = [], 0
    for index, (text, reason, tokens) in enumerate(results):
        completion += tokens
        message, reason = answer_message(served, body, text, reason, f"{number}/{index}")
        out.append({"index": index, "message": message, "finish_reason": reason, "logprobs": None})
    return {**head, "object": "chat.completion", "choices": out,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                      "total_tokens": len(ids) + completion}}


def answer_message(served: Served, body: ChatRequest, text: str, reason: str, seed: str) -> tuple[dict, str]:
    """The assistant message: tool calls parsed out of the text when the request offered tools."""
    if body.tools:
        before, calls = parse_calls(text, served.tool_format)
        if calls:
            return {"role": "assistant", "content": before or None,
                    "tool_calls": openai_tool_calls(calls, seed)}, "tool_calls"
    return {"role": "assistant", "content": text}, reason


async def stream(served: Served, body: ChatRequest, ids, choices, head: dict):
    """Server-sent events: a role delta, text deltas as they are decoded, a finish chunk per choice.
    With `tools` the text is held to the end, where it becomes either tool_calls or content."""
    chunk = {**head, "object": "chat.completion.chunk"}

    def event(choice: dict | None, usage: dict | None = None) -> str:
        payload = {**chunk, "choices": [choice] if choice else []}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    for index in range(len(choices)):
        yield event({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    merged = generation.merged_pieces(served.engine, served.chat_format.tokenizer, ids, choices, body.stops())
    texts, completion = [""] * len(choices), 0
    try:
        async for index, piece, reason, tokens in merged:
            if piece and not body.tools:
                yield event({"index": index, "delta": {"content": piece}, "finish_reason": None})
            texts[index] += piece or ""
            if reason is None:
                continue
            completion += tokens
            delta = {}
            if body.tools:
                message, reason = answer_message(served, body, texts[index], reason, f"{head['id']}/{index}")
                delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                for position, call in enumerate(delta.get("tool_calls", [])):
                    call["index"] = position
            yield event({"index": index, "delta": delta, "finish_reason": reason})
    finally:
        await merged.aclose()  # a client that went away: its rows leave the batch
    if body.stream_options and body.stream_options.include_usage:
        yield event(None, {"prompt_tokens": len(ids), "completion_tokens": completion,
                           "total_tokens": len(ids) + completion})
    yield "data: [DONE]\n\n"
