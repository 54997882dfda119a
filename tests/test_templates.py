"""Chat templates: rendering equals apply_chat_template; named templates (their text, their jinja
for chat and export, their errors); tool rendering both ways."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.tiny_model import build_tokenizer
from tunepipe.data.chat.named_templates import TEMPLATES, jinja
from tunepipe.data.chat.templates import ChatFormat, reads_tools
from tunepipe.errors import TunepipeError

# A small tool-aware template in the style of Qwen2.5's: it reads `tools` and renders
# tool_calls and tool results itself (written for this test).
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools:' }}{% for tool in tools %}{{ '\\n' + tool | tojson }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}{{ '<|im_start|>assistant\\n' }}"
    "{% for call in message.tool_calls %}{{ '<call>' + call.function | tojson + '</call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif message.role == 'tool' %}{{ '<|im_start|>tool\\n' + message.content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

TOOL_ROW = {
    "system": "", "tools": json.dumps([{"name": "add", "description": "add numbers",
                                         "parameters": {"type": "object", "properties": {}}}]),
    "messages": [{"role": "user", "content": "2+2?"},
                 {"role": "function_call", "content": json.dumps({"name": "add", "arguments": {"a": 2, "b": 2}})},
                 {"role": "observation", "content": "4"},
                 {"role": "assistant", "content": "It is 4."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def hf_render(tokenizer, chat, template, **kw):
    return tokenizer.apply_chat_template(chat.messages, tools=chat.tools, chat_template=template,
                                         tokenize=False, **kw)


@pytest.mark.parametrize("name", [None, *TEMPLATES])
def test_rendering_equals_apply_chat_template(tokenizer, name):
    fmt = ChatFormat(tokenizer, name)
    row = {"system": "Be brief.", "tools": "", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}
    for system in ("Be brief.", ""):
        chat = fmt.chat({**row, "system": system})
        assert fmt.render(chat) == hf_render(tokenizer, chat, fmt.template)
        assert fmt.render(chat, 3, add_generation_prompt=True) == tokenizer.apply_chat_template(
            chat.messages[:3], chat_template=fmt.template, tokenize=False, add_generation_prompt=True)
        # every named template renders the prompt as a prefix of the conversation
        assert fmt.render(chat).startswith(fmt.render(chat, chat.answers[-1], add_generation_prompt=True))


def turns_text(fmt: ChatFormat, row: dict) -> str:
    """The turns a named template builds, as text (BOS / EOS ids written as their tokens)."""
    tokens = fmt.tokenizer.convert_ids_to_tokens
    return "".join(e if isinstance(e, str) else tokens(e) for turn in fmt.turns(row) for e in turn)


def test_named_templates_build_llamafactorys_text():
    row = {"system": "", "tools": "", "messages": [{"role": "user", "content": "Q"},
                                                   {"role": "assistant", "content": "A"}]}
    text = {name: turns_text(ChatFormat(build_tokenizer(), name), row) for name in TEMPLATES}
    eos = build_tokenizer().eos_token
    assert text["chatml"] == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert text["qwen"] == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                            "assistant.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
    assert text["qwen3"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")
    assert "<think>" not in text["qwen3_nothink"]
    assert text["alpaca"] == ("Below is an instruction that describes a task. Write a response that appropriately "
                              f"completes the request.\n\n### Instruction:\nQ\n\n### Response:\nA{eos}\n\n")
    assert text["default"] == f"Human: Q{eos}\nAssistant:A{eos}\n"  # EOS after the user turn, no space
    assert text["empty"] == "QA"
    bos = build_tokenizer().bos_token
    assert text["llama2"] == f"{bos}[INST] Q [/INST]A{eos}"
    assert text["gemma2"] == bos + "<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
    # replace_eos: the first stop word becomes the EOS token (new to this tokenizer, so added)
    llama3 = ChatFormat(build_tokenizer(), "llama3")
    assert llama3.tokenizer.eos_token == "<|eot_id|>" and "<|eom_id|>" in llama3.added_tokens
    system = turns_text(llama3, {**row, "system": "S"})
    assert system.startswith(bos + "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>")
    assert turns_text(ChatFormat(build_tokenizer(), "mistral"), {**row, "system": "S"}) == f"{bos}[INST] S\n\nQ[/INST] A{eos}"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_named_template_jinja_renders_the_training_text(name):
    """chat, evaluation prompts and the export (tokenizer + Modelfile) use the jinja form: it must
    write what training saw, system prompt (given or default) and multi-turn included."""
    fmt = ChatFormat(build_tokenizer(), name)
    for system in ("Be brief.", ""):
        row = {"system": system, "tools": "", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}
        messages = ([{"role": "system", "content": system}] if system else []) + row["messages"]
        rendered = fmt.tokenizer.apply_chat_template(messages, chat_template=fmt.template, tokenize=False)
        expected = turns_text(fmt, row)
        if TEMPLATES[name].reasoning:  # the empty thought is the model's to write at inference
            expected = expected.replace("<think>\n\n</think>\n\n", "")
        assert rendered == expected


def test_template_errors(tokenizer):
    with pytest.raises(TunepipeError, match="data.template='nope': unknown template") as err:
        ChatFormat(tokenizer, "nope")
    assert "vicuna" in err.value.hint and "omit `template` to use the model's own chat template" in err.value.hint
    with pytest.raises(TunepipeError, match="data.tool_format='glm4'"):
        ChatFormat(tokenizer, None, tool_format="glm4")
    with pytest.raises(TunepipeError, match="data.tool_format='xml'"):
        ChatFormat(tokenizer, "qwen", tool_format="xml")
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(TunepipeError, match="has no chat template") as err:
        ChatFormat(bare, None)
    assert "chatml" in err.value.hint
    assert ChatFormat(bare, "chatml").template == jinja(TEMPLATES["chatml"], bare)


def test_tools_fall_back_to_tagged_text_when_the_template_ignores_them(tokenizer):
    fmt = ChatFormat(tokenizer)  # the fixture's ChatML template, like SmolLM2's, never reads `tools`
    assert not fmt.native_tools and not reads_tools(fmt.template)
    chat = fmt.chat(TOOL_ROW)
    assert chat.tools is None and chat.answers == [2, 4]
    system, _user, call, result, answer = chat.messages
    assert system["role"] == "system" and "<tools>\n" + json.dumps(json.loads(TOOL_ROW["tools"])[0]) in system["content"]
    assert call == {"role": "assistant",
                    "content": '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call>'}
    assert result == {"role": "user", "content": "<tool_response>\n4\n</tool_response>"}
    assert answer == {"role": "assistant", "content": "It is 4."}
    assert fmt.render(chat) == hf_render(tokenizer, chat, fmt.template)


def test_tools_render_natively_when_the_template_supports_them(tokenizer):
    tool_tokenizer = build_tokenizer()
    tool_tokenizer.chat_template = TOOL_TEMPLATE
    fmt = ChatFormat(tool_tokenizer)
    assert fmt.native_tools
    chat = fmt.chat(TOOL_ROW)
    assert chat.tools == [{"type": "function", "function": json.loads(TOOL_ROW["tools"])[0]}]
    assert chat.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
    assert chat.messages[2] == {"role": "tool", "content": "4"}
    text = fmt.render(chat)
    assert text == hf_render(tool_tokenizer, chat, TOOL_TEMPLATE)
    assert '<call>{"name": "add", "arguments": {"a": 2, "b": 2}}</call>' in text and "Tools:\n{" in text
    # tool_format: qwen forces the tagged text form even with a tool-aware template
    assert not ChatFormat(tool_tokenizer, None, tool_format="qwen").native_tools


def test_chat_export_and_generation_follow_the_named_template():
    from tunepipe.data.chat.chat_format import stop_token_ids
    from tunepipe.data.chat.named_templates import stop_words
    from tunepipe.data.chat.templates import apply_template
    from tunepipe.export.modelfile import modelfile_text

    tokenizer = apply_template(build_tokenizer(), "qwen")
    text, has_template = modelfile_text(tokenizer)
    assert has_template and 'SYSTEM """You are Qwen, created by Alibaba Cloud.' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    chatml = apply_template(build_tokenizer(), "chatml")
    assert chatml.convert_tokens_to_ids("<|im_start|>") in stop_token_ids(chatml, None, stop_words("chatml"))
    # chat's prompt: the template's turns, each tokenized alone (alpaca's "\n\n" pieces included)
    alpaca = ChatFormat(build_tokenizer(), "alpaca")
    history = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
               {"role": "user", "content": "R"}]
    encode = alpaca.tokenizer
    pieces = [alpaca.named.default_system, "### Instruction:\nQ\n\n### Response:\n", "A", encode.eos_token_id, "\n\n",
              "### Instruction:\nR\n\n### Response:\n"]
    expected = [i for p in pieces for i in (encode(p, add_special_tokens=False)["input_ids"]
                                            if isinstance(p, str) else [p])]
    assert alpaca.prompt_ids("", history) == expected
