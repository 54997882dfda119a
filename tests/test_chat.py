"""`tunepipe chat`: answers a piped prompt with what the model generates, stops at /exit,
forgets at /reset, passes --system through the chat template."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from tests.fixtures.adapters import make_adapter
from tunepipe.chat import ChatSession, repl
from tunepipe.config.loader import load_config


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    # A strong adapter: the random tiny model alone ends every answer at once.
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("chat") / "adapter", scale=1.0)


def expected_answer(tiny_model_dir, adapter, messages, max_new_tokens=6) -> str:
    from tunepipe.models.base import load_causal_lm, load_tokenizer
    from tunepipe.models.trained import apply_adapters

    tokenizer = load_tokenizer(tiny_model_dir)
    model = apply_adapters(load_causal_lm(tiny_model_dir), [adapter])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_chat_answers_a_piped_prompt_and_stops_at_exit(tiny_model_dir, adapter, tmp_path, monkeypatch, capsys):
    from tunepipe.cli import main

    cfg = tmp_path / "chat.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {adapter}\n"
                   "max_new_tokens: 6\nreport_to: none\n")
    # In-process with a non-terminal stdin: the path `printf ... | tunepipe chat` takes, without
    # paying a second interpreter's torch import.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who are you?\n/exit\nnever answered\n"))
    assert main(["chat", str(cfg), "--system", "Be brief."]) == 0
    captured = capsys.readouterr()
    answers = [line for line in captured.out.splitlines() if line.startswith("Assistant: ")]
    assert len(answers) == 1  # the line after /exit is never read as a turn
    want = expected_answer(tiny_model_dir, adapter, [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Who are you?"}])
    assert want.strip() and answers[0] == f"Assistant: {want}".rstrip()
    assert "chatting with" in captured.err and str(adapter) in captured.err


@pytest.fixture(scope="module")
def session(tiny_model_dir, adapter):
    from tunepipe.models.base import load_causal_lm, load_tokenizer
    from tunepipe.models.trained import apply_adapters

    cfg = load_config(None, ["eval.max_new_tokens=4", "tracking.report_to=none"])
    model = apply_adapters(load_causal_lm(tiny_model_dir), [adapter])
    return ChatSession(model, load_tokenizer(tiny_model_dir), cfg, system="S")


def test_reset_forgets_the_conversation_and_unknown_commands_are_explained(session):
    out = io.StringIO()
    answered = repl(session, io.StringIO("hello\n\n/what\nagain\n"), out, interactive=False)
    assert answered == 2
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert "unknown command /what" in out.getvalue()
    repl(session, io.StringIO("/reset\n"), out, interactive=False)
    assert session.messages() == [{"role": "system", "content": "S"}]
    assert "(conversation reset)" in out.getvalue()


def test_second_turn_sees_the_first(session, tiny_model_dir, adapter):
    session.reset()
    out = io.StringIO()
    repl(session, io.StringIO("one\ntwo\n"), out, interactive=False)
    first = session.history[1]["content"]
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "one"},
               {"role": "assistant", "content": first}, {"role": "user", "content": "two"}]
    assert session.history[3]["content"] == expected_answer(tiny_model_dir, adapter, history, 4).strip()


def test_a_named_template_builds_the_prompt_as_training_did(session, monkeypatch):
    """With `template: alpaca` the prompt is alpaca's turns, each tokenized alone (its default
    system prompt included), not the tokenizer's own ChatML."""
    from tunepipe import chat
    from tunepipe.data.chat.templates import ChatFormat

    seen = []
    monkeypatch.setattr(chat, "stream_answer", lambda model, tokenizer, ids, cfg, out, images: seen.append(ids) or "A")
    named = ChatSession(session.model, session.tokenizer,
                        load_config(None, ["data.template=alpaca", "tracking.report_to=none"]))
    repl(named, io.StringIO("Q\nR\n"), io.StringIO(), interactive=False)
    history = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}]
    assert seen[1] == ChatFormat(session.tokenizer, "alpaca").prompt_ids("", history)
    text = session.tokenizer.decode(seen[1])
    assert text.startswith("Below is an instruction") and text.endswith("### Instruction:\nR\n\n### Response:\n")
    assert "<|im_start|>" not in text
