"""`tunepipe serve` through the official openai client: every endpoint and option on the tiny model."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from tests.fixtures.serving import openai_client, running, serve_config
from tunepipe.layout import Layout

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir, strong_adapter, tmp_path_factory):
    from tunepipe.serve.server import build_served

    cfg = serve_config(tiny_model_dir, strong_adapter)
    return build_served(cfg, Layout.at(tmp_path_factory.mktemp("serve-out")), model_name=MODEL)


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url, timeout=60)


def ask(client, messages=QUESTION, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def reference_greedy(served, messages, max_tokens) -> str:
    """transformers' own greedy generate on the prompt the server builds."""
    from tunepipe.serve.prompts import canonical_row, prompt_ids

    fmt = served.chat_format
    ids = prompt_ids(fmt, canonical_row(messages, None))
    with torch.inference_mode():
        out = served.engine.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                           eos_token_id=list(served.engine.stop_ids),
                                           pad_token_id=served.engine.pad_id)
    return fmt.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_models_lists_the_served_id(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_answer_equals_transformers_generate_and_counts_usage(client, served):
    reply = ask(client, max_tokens=12)
    want = reference_greedy(served, QUESTION, 12)
    assert want and reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 5 and reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_stream_reassembles_to_the_plain_answer(client):
    plain = ask(client, max_tokens=12)
    chunks = list(ask(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stop_string_cuts_the_answer(client):
    full = ask(client, max_tokens=12).choices[0].message.content
    stop = full[4:6]
    cut = ask(client, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, max_tokens=12, stop=stop, stream=True)
                       if c.choices)
    assert streamed == full[: full.find(stop)]


def test_seeded_sampling_repeats_and_n_gives_distinct_choices(client):
    first = ask(client, temperature=1.0, seed=7, n=3, max_tokens=10)
    again = ask(client, temperature=1.0, seed=7, n=3, max_tokens=10)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1
    assert 3 <= first.usage.completion_tokens <= 30  # summed over the three choices
    other = ask(client, temperature=1.0, seed=8, max_tokens=10).choices[0].message.content
    assert other != texts[0]


def test_tiny_top_p_samples_the_greedy_answer(client):
    greedy = ask(client, max_tokens=10).choices[0].message.content
    nucleus = ask(client, temperature=1.0, top_p=1e-6, seed=3, max_tokens=10).choices[0].message.content
    assert nucleus == greedy


def test_system_prompt_changes_the_prompt(client):
    plain = ask(client, max_tokens=1)
    with_system = ask(client, [{"role": "system", "content": "Be brief and kind."}, *QUESTION], max_tokens=1)
    assert with_system.usage.prompt_tokens != plain.usage.prompt_tokens


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": QUESTION}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": QUESTION, "n": 99}, 400, "n"),
])
def test_bad_requests_get_openai_errors(url, body, status, param):
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_malformed_json_is_400_and_the_server_keeps_serving(url, client):
    response = httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, [{"role": "user", "content": "word " * 3000}])
    assert caught.value.code == "context_length_exceeded"
    assert ask(client, max_tokens=3).choices[0].message.content  # still serving


def test_client_leaving_mid_stream_frees_its_slot(url, served, client):
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 20
    while served.engine.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.engine.rows == []  # generation stopped long before 1500 tokens
    assert ask(client, max_tokens=3).choices[0].message.content


def test_api_key_is_required_when_set(served, tmp_path):
    from dataclasses import replace

    from tunepipe.serve.app import create_app

    locked = replace(served, api_key="s3cret-key")
    app = create_app(locked)
    # the same engine: `running` closes it at the end, so hand it a stand-in to close
    holder = type("Holder", (), {"engine": type("E", (), {"close": lambda self: None})()})()
    with running(app, holder) as base:
        response = httpx.get(base + "/v1/models", timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert "s3cret-key" not in response.text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=base + "/v1", api_key="s3cret-key", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == [MODEL]
        assert keyed.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                             max_tokens=2).usage.completion_tokens >= 1


def test_sse_wire_format_ends_with_done(url):
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
