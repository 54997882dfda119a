"""Chat templates: the tokenizer's own jinja first, named templates for base models without one.

Rendering goes through the same sandboxed jinja environment transformers'
`apply_chat_template` uses (and the same template variables), so the token ids the
tokenize stage writes equal `tokenizer.apply_chat_template(conversation)` exactly;
the golden tests check this. Named templates are jinja too, so they take the same path.

Tools: when the template reads `tools` (Qwen2.5, Llama 3.1, ...), tool definitions are
passed as `tools=` and function calls / results become assistant `tool_calls` / `tool`
messages, rendered however the template renders them. When it does not (SmolLM2,
ChatML, the named templates) tunepipe falls back to the common tagged text convention:
the definitions are appended to the system prompt inside <tools></tools>, each call is
an assistant turn `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, each result
a user turn inside <tool_response></tool_response>.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from tunepipe.errors import TunepipeError

DEFAULT_SYSTEM_QWEN = "You are a helpful assistant."
DEFAULT_SYSTEM_ALPACA = ("Below is an instruction that describes a task. "
                         "Write a response that appropriately completes the request.")

# Written for tunepipe; each renders the system / user / assistant roles the fallback produces.
NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "qwen": (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_QWEN + "<|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token or '' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        "{% else %}{{ '" + DEFAULT_SYSTEM_ALPACA + "\n\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + (eos_token or '') + '\n\n' }}{% endif %}"
        "{% endfor %}"),
    "default": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\nAssistant:' }}"
        "{% else %}{{ ' ' + message['content'] + (eos_token or '') + '\n' }}{% endif %}"
        "{% endfor %}"),
    "empty": (
        "{% for message in messages %}{{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{% endfor %}"),
}
TRAINED_ROLES = ("assistant", "function_call")
TOOL_FORMATS = (None, "qwen")  # qwen: force the tagged <tool_call> text form


@dataclass
class Chat:
    """A canonical row as the template sees it."""

    messages: list[dict]
    tools: list[dict] | None
    answers: list[int]  # indices of the assistant-side turns in `messages`


class ChatFormat:
    """Render conversations with one jinja template, as apply_chat_template would."""

    def __init__(self, tokenizer, name: str | None = None, tool_format: str | None = None):
        if name is not None and name not in NAMED_TEMPLATES:
            raise TunepipeError(f"data.template={name!r}: unknown template",
                                hint=f"leave it unset to use the tokenizer's own, or use one of "
                                     f"{', '.join(NAMED_TEMPLATES)}")
        if tool_format not in TOOL_FORMATS:
            raise TunepipeError(f"data.tool_format={tool_format!r}: not supported",
                                hint="leave it unset to use the chat template's own tool support, "
                                     "or qwen for <tool_call> tags in the text")
        self.tokenizer = tokenizer
        self.name = name or "tokenizer"
        if name is None and not tokenizer.chat_template:
            raise TunepipeError("the base model's tokenizer has no chat template",
                                hint=f"set data.template to one of {', '.join(NAMED_TEMPLATES)}")
        self.template = NAMED_TEMPLATES[name] if name else tokenizer.get_chat_template()
        self.tool_template = NAMED_TEMPLATES[name] if name else tokenizer.get_chat_template(None, tools=[{}])
        self.native_tools = tool_format is None and reads_tools(self.tool_template)
        self.variables = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes to templates

    def render(self, chat: Chat, upto: int | None = None, add_generation_prompt: bool = False) -> str:
        messages = chat.messages if upto is None else chat.messages[:upto]
        template = self.tool_template if chat.tools else self.template
        return _compiled(template).render(messages=messages, tools=chat.tools, documents=None,
                                          add_generation_prompt=add_generation_prompt, **self.variables)

    def chat(self, row: dict, extra: dict | None = None) -> Chat:
        """Canonical row (plus an optional final answer) -> messages the template understands."""
        tools = parse_tools(row.get("tools", ""))
        system = row.get("system") or ""
        if tools and not self.native_tools:
            system = tools_system_prompt(system, tools)
        messages = [{"role": "system", "content": system}] if system else []
        answers = []
        for turn in row["messages"] + ([extra] if extra else []):
            if turn["role"] in TRAINED_ROLES:
                answers.append(len(messages))
            messages.append(self.message(turn))
        return Chat(messages, tools if self.native_tools else None, answers)

    def message(self, turn: dict) -> dict:
        role, content = turn["role"], turn["content"]
        if role == "function_call":
            calls = function_calls(content)
            if self.native_tools:
                return {"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": call} for call in calls]}
            return {"role": "assistant", "content": "\n".join(
                f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>" for call in calls)}
        if role == "observation":
            if self.native_tools:
                return {"role": "tool", "content": content}
            return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
        return turn  # user / assistant turns are already {role, content}


@functools.cache
def _compiled(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


@functools.cache
def reads_tools(template: str) -> bool:
    """Whether a jinja chat template uses the `tools` variable."""
    import jinja2
    import jinja2.meta

    return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))


def parse_tools(text: str) -> list[dict] | None:
    """Canonical `tools` JSON -> the list of {"type": "function", "function": {...}} HF templates expect."""
    if not text or not text.strip():
        return None
    tools = json.loads(text)
    tools = [tools] if isinstance(tools, dict) else tools
    wrapped = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    return wrapped or None


def function_calls(content: str) -> list[dict]:
    """A function_call turn's JSON ({"name", "arguments"} or a list of them) as a list of calls."""
    calls = json.loads(content)
    calls = calls if isinstance(calls, list) else [calls]
    return [{"name": c["name"], "arguments": _arguments(c.get("arguments", {}))} for c in calls]


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def tools_system_prompt(system: str, tools: list[dict]) -> str:
    """Tool definitions as text, for templates that do not render `tools` themselves."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    text = ("You can call the tools below. Each is described by a JSON schema:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a tool, answer with <tool_call>{\"name\": <tool name>, \"arguments\": <arguments object>}"
            "</tool_call>. Each result comes back inside <tool_response></tool_response>.")
    return f"{system}\n\n{text}" if system else text
