"""LLaMA-Factory's eval decoding keys (num_beams and its two other names, repetition_penalty,
length_penalty, skip_special_tokens) reach the `generate` call of the eval stage and chat, and
change what comes out; default_system replaces the template's system prompt in prompts and chat."""

from __future__ import annotations

import io

import pytest

from tests.fixtures.adapters import QUESTIONS, make_adapter, sft_row
from tunepipe.config import Config, EvalConfig
from tunepipe.config.loader import load_config
from tunepipe.evaluate.generation import generate


@pytest.fixture(scope="module")
def talkative(tiny_model_dir, tmp_path_factory):
    """The tiny model with a strong adapter (alone, the random model ends every answer at once)."""
    from peft import PeftModel

    from tunepipe.models.base import load_causal_lm, load_tokenizer

    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("decoding") / "a", scale=1.0)
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(adapter)).eval()
    return model, load_tokenizer(tiny_model_dir)


def recorded_generate(model, monkeypatch) -> list[dict]:
    calls = []
    real = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_beam_search_and_penalties_reach_generate(talkative, monkeypatch):
    model, tokenizer = talkative
    prompts = [sft_row(tokenizer, q, a)["prompt_ids"] for q, a in QUESTIONS[:3]]
    calls = recorded_generate(model, monkeypatch)
    greedy = generate(model, tokenizer, prompts, EvalConfig(max_new_tokens=8), batch_size=3, seed=0)
    beams = generate(model, tokenizer, prompts, EvalConfig(max_new_tokens=8, num_beams=3, length_penalty=0.5),
                     batch_size=3, seed=0)
    penalised = generate(model, tokenizer, prompts, EvalConfig(max_new_tokens=8, repetition_penalty=3.0),
                         batch_size=3, seed=0)
    assert "num_beams" not in calls[0] and calls[0]["repetition_penalty"] == 1.0
    assert calls[1]["num_beams"] == 3 and calls[1]["length_penalty"] == 0.5
    assert calls[2]["repetition_penalty"] == 3.0
    assert beams != greedy and penalised != greedy  # each changed what was generated


def test_skip_special_tokens_reaches_the_decoding(talkative, monkeypatch):
    model, tokenizer = talkative
    prompts = [sft_row(tokenizer, q, a)["prompt_ids"] for q, a in QUESTIONS[:2]]
    decoded = []
    real = tokenizer.batch_decode

    def spy(tokens, **kwargs):
        decoded.append((tokens.tolist(), kwargs["skip_special_tokens"]))
        return real(tokens, **kwargs)

    monkeypatch.setattr(tokenizer, "batch_decode", spy)
    for skip in (True, False):
        answers = generate(model, tokenizer, prompts, EvalConfig(max_new_tokens=6, skip_special_tokens=skip),
                           batch_size=2, seed=0)
        tokens, seen = decoded[-1]
        assert seen is skip
        assert answers == [real([row], skip_special_tokens=skip)[0].strip() for row in tokens]


def test_chat_passes_the_penalty_and_streams_one_beam(talkative, monkeypatch, caplog):
    from tunepipe import chat

    model, tokenizer = talkative
    calls = recorded_generate(model, monkeypatch)
    cfg = Config(eval=EvalConfig(max_new_tokens=3, repetition_penalty=2.0, num_beams=4))
    ids = sft_row(tokenizer, "Who are you?", "x")["prompt_ids"]
    chat.stream_answer(model, tokenizer, ids, cfg, io.StringIO())
    assert calls[0]["repetition_penalty"] == 2.0 and "num_beams" not in calls[0]
    assert "beam search cannot" in caplog.text


@pytest.mark.parametrize("key", ["num_beams", "eval_num_beams", "generation_num_beams"])
def test_llamafactory_beam_keys_are_one_key(tmp_path, key):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"{key}: 4\nrepetition_penalty: 1.2\nskip_special_tokens: false\n")
    cfg = load_config(path)
    assert (cfg.eval.num_beams, cfg.eval.repetition_penalty, cfg.eval.skip_special_tokens) == (4, 1.2, False)


def test_decoding_values_are_checked():
    from tunepipe.errors import TunepipeError

    with pytest.raises(TunepipeError, match="num_beams"):
        load_config(None, ["eval.num_beams=0"])


def test_default_system_replaces_the_templates_own(talkative):
    from tunepipe.data.chat.templates import ChatFormat

    _, tokenizer = talkative
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
           "system": "", "tools": ""}

    def prompt(template, default_system=None, system=""):
        fmt = ChatFormat(tokenizer, template, default_system=default_system)
        return "".join(text for turn in fmt.turns({**row, "system": system}) for text in turn
                       if isinstance(text, str))

    assert "Below is an instruction" in prompt("alpaca")  # alpaca's own system prompt
    replaced = prompt("alpaca", default_system="You are Tuney.")
    assert replaced.startswith("You are Tuney.") and "Below is an instruction" not in replaced
    assert "You are Tuney." in prompt(None, default_system="You are Tuney.")  # the tokenizer's template too
    assert "Own prompt" in prompt(None, "You are Tuney.", system="Own prompt")  # a row's own system wins
    assert "You are Tuney." not in prompt(None, "You are Tuney.", system="Own prompt")


def test_chat_takes_default_system(talkative, monkeypatch):
    from tunepipe import chat
    from tunepipe.chat import ChatSession, repl

    model, tokenizer = talkative
    seen = []
    monkeypatch.setattr(chat, "stream_answer", lambda model, tokenizer, ids, cfg, out, images: seen.append(ids) or "A")
    cfg = load_config(None, ["data.default_system=You are Tuney.", "tracking.report_to=none"])
    repl(ChatSession(model, tokenizer, cfg), io.StringIO("Q\n"), io.StringIO(), interactive=False)
    assert "You are Tuney." in tokenizer.decode(seen[0])
