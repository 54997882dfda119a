"""Chat templates: rendering equals apply_chat_template; named templates; tool rendering both ways."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.tiny_model import build_tokenizer
from tunepipe.data.templates import NAMED_TEMPLATES, ChatFormat, reads_tools
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


@pytest.mark.parametrize("name", [None, *NAMED_TEMPLATES])
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


def test_named_templates_render_their_formats(tokenizer):
    row = {"system": "", "tools": "", "messages": [{"role": "user", "content": "Q"},
                                                   {"role": "assistant", "content": "A"}]}
    eos = tokenizer.eos_token
    rendered = {name: ChatFormat(tokenizer, name).render(ChatFormat(tokenizer, name).chat(row))
                for name in NAMED_TEMPLATES}
    assert rendered["chatml"] == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert rendered["qwen"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert rendered["llama3"] == (f"{tokenizer.bos_token}<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                                  "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>")
    assert rendered["alpaca"].endswith(f"### Instruction:\nQ\n\n### Response:\nA{eos}\n\n")
    assert rendered["default"] == f"Human: Q\nAssistant: A{eos}\n"
    assert rendered["empty"] == f"QA{eos}"


def test_template_errors(tokenizer):
    with pytest.raises(TunepipeError, match="data.template='vicuna': unknown template"):
        ChatFormat(tokenizer, "vicuna")
    with pytest.raises(TunepipeError, match="data.tool_format='glm4'"):
        ChatFormat(tokenizer, None, tool_format="glm4")
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(TunepipeError, match="has no chat template") as err:
        ChatFormat(bare, None)
    assert "chatml" in err.value.hint
    assert ChatFormat(bare, "chatml").template == NAMED_TEMPLATES["chatml"]


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
