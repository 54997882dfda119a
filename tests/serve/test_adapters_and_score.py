"""Several adapters served as separate model ids on one base, and `/v1/score/evaluation` for a reward model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.fixtures.adapters import make_adapter, make_reward_adapter
from tests.fixtures.serving import openai_client, running, serve_config
from tunepipe.layout import Layout

QUESTIONS = ["Who are you?", "What is the capital of France?", "Give three tips for staying healthy.",
             "你好，你是谁？"]
TEXTS = ["The capital of France is Paris.", "I am Tuney, an assistant.", "no"]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed=seed, scale=1.0)
            for name, seed in (("alpha", 11), ("beta", 12))}


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters, tmp_path_factory):
    from tunepipe.serve.server import build_served

    cfg = serve_config(tiny_model_dir, ",".join(str(p) for p in adapters.values()), **{"eval.max_new_tokens": 10})
    return build_served(cfg, Layout.at(tmp_path_factory.mktemp("multi-out")), model_name="tiny")


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url, timeout=120)


def ask(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=10)
    return reply.choices[0].message.content


def alone(tiny_model_dir, adapter, served, questions) -> list[str]:
    """Greedy answers of base + this one adapter, loaded by PEFT alone (no server, no other adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunepipe.serve.prompts import canonical_row, prompt_ids

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    fmt, answers = served.chat_format, []
    for question in questions:
        ids = prompt_ids(fmt, canonical_row([{"role": "user", "content": question}], None))
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=list(served.engine.stop_ids), pad_token_id=served.engine.pad_id)
        answers.append(fmt.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    return answers


def test_models_lists_one_id_per_adapter(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]


def test_each_id_answers_as_its_adapter_alone(client, served, adapters, tiny_model_dir):
    want = {name: alone(tiny_model_dir, path, served, QUESTIONS[:2]) for name, path in adapters.items()}
    assert want["alpha"] != want["beta"]  # the adapters really differ
    for name in adapters:
        assert [ask(client, name, q) for q in QUESTIONS[:2]] == want[name]
    assert ask(client, "tiny", QUESTIONS[0]) == want["alpha"][0]  # API_MODEL_NAME: the first adapter


def test_concurrent_requests_to_both_ids_are_not_mixed(client, served):
    jobs = [(name, q) for q in QUESTIONS for name in ("alpha", "beta")] * 2
    one_at_a_time = {job: ask(client, *job) for job in set(jobs)}
    served.engine.forwards = []
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(client, *job), jobs))
    assert answers == [one_at_a_time[job] for job in jobs]
    assert {adapter for adapter, _ in served.engine.forwards} == {"a0", "a1"}
    assert all(rows == {adapter} for adapter, rows in served.engine.forwards)  # one adapter per forward


def test_score_on_a_chat_model_is_a_clear_400(url):
    reply = httpx.post(url + "/v1/score/evaluation", json={"model": "alpha", "messages": TEXTS}, timeout=60)
    assert reply.status_code == 400
    assert "not a reward model" in reply.json()["error"]["message"]


@pytest.fixture(scope="module")
def reward(tiny_model_dir, tmp_path_factory):
    from tunepipe.serve.server import build_served

    adapter = make_reward_adapter(tiny_model_dir, tmp_path_factory.mktemp("rm") / "rm")
    served = build_served(serve_config(tiny_model_dir, adapter), Layout.at(tmp_path_factory.mktemp("rm-out")),
                          model_name="judge")
    from tunepipe.serve.app import create_app

    with running(create_app(served), served) as base:
        yield base, adapter


def test_score_evaluation_equals_score_texts(reward, tiny_model_dir):
    from tunepipe.evaluate.scoring import load_reward_model, score_texts
    from tunepipe.models.base import load_tokenizer

    url, adapter = reward
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_reward_model(adapter, tiny_model_dir, tokenizer.pad_token_id)
    for max_length in (None, 4):
        body = {"model": "judge", "messages": TEXTS, **({"max_length": max_length} if max_length else {})}
        reply = httpx.post(url + "/v1/score/evaluation", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        got = reply.json()
        assert got["model"] == "judge" and got["object"] == "score.evaluation" and got["id"].startswith("scoreval-")
        assert got["scores"] == pytest.approx(score_texts(model, tokenizer, TEXTS, max_length=max_length), abs=1e-5)
    assert got["scores"] != pytest.approx(score_texts(model, tokenizer, TEXTS), abs=1e-5)  # max_length cut


def test_chat_on_a_reward_model_is_a_clear_400(reward):
    client = openai.OpenAI(base_url=reward[0] + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="reward model"):
        client.chat.completions.create(model="judge", messages=[{"role": "user", "content": "hi"}])
