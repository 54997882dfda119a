"""OpenAI chat messages -> the prompt ids training built, and the model's text -> `tool_calls`.

The prompt goes through the same `ChatFormat` as `tunepipe chat` and the tokenize stage
(named template or the tokenizer's own, turn by turn, `data.template_date` as the date), so
the server sees exactly the format the model was tuned on. OpenAI's roles map onto the
canonical row's: `system` (lifted), `user`, `assistant` (with `tool_calls`: a function_call
turn), `tool` (an observation).

Tool calls come back in whatever form the template's tool format writes them; `parse_calls`
reads each form back (the inverse of `tool_formats.calls_text`).
"""

from __future__ import annotations

import json
import re
import uuid

from tunepipe.errors import TunepipeError

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def text_of(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise TunepipeError(f"content part of type {part.get('type')!r} is not supported (text only)")
        texts.append(part.get("text", ""))
    return "".join(texts)


def canonical_row(messages: list[dict], tools: list[dict] | None) -> dict:
    """The request as a canonical row awaiting its answer (`messages[i]` named in errors)."""
    system, turns = "", []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise TunepipeError(f"messages[{index}].role {role!r} is not one of {', '.join(ROLES)}")
        content = text_of(message.get("content"))
        if role in ("system", "developer"):
            if turns:
                raise TunepipeError(f"messages[{index}]: a {role} message must come before the conversation")
            system += content
        elif role == "assistant" and message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                     for c in message["tool_calls"]]
            turns.append({"role": "function_call", "content": json.dumps(calls, ensure_ascii=False)})
        elif role in ("tool", "function"):
            turns.append({"role": "observation", "content": content})
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] not in ("user", "observation"):
        raise TunepipeError("the last message must be from the user or a tool (the answer comes next)")
    return {"system": system, "tools": json.dumps(tools, ensure_ascii=False) if tools else "", "messages": turns}


def _arguments(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            raise TunepipeError(f"tool_calls arguments are not JSON: {arguments[:60]!r}") from None
    return arguments or {}


def prompt_ids(chat_format, row: dict) -> list[int]:
    """Token ids of the row's turns, as training tokenized them."""
    tokenizer = chat_format.tokenizer
    return [i for turn in chat_format.turns(row) for element in turn
            for i in (tokenizer(element, add_special_tokens=False)["input_ids"]
                      if isinstance(element, str) else [element])]


# -- tool calls in the model's text -----------------------------------------------------
TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
ACTION = re.compile(r"Action:\s*(.+?)\s*\nAction Input:\s*(.*?)(?=\nAction:|\Z)", re.DOTALL)


def parse_calls(text: str, tool_format: str | None) -> tuple[str, list[dict]]:
    """(text before the calls, [{"name", "arguments" (JSON text)}]); no calls: (text, [])."""
    if tool_format == "default":
        return _parse_actions(text)
    if tool_format == "qwen3_5":
        return _parse_functions(text)
    if tool_format == "glm4":
        name, _, body = text.partition("\n")
        obj = _json(body)
        return (text, []) if not name.strip() or not isinstance(obj, dict) else ("", [_call(name.strip(), obj)])
    tagged = TAGGED.findall(text)
    if tagged:
        calls = [_from_object(_json(body)) for body in tagged]
        if all(calls):
            return text[: text.find("<tool_call>")].strip(), calls
    obj = _json(text.strip().removeprefix("[TOOL_CALLS]").strip())  # llama3 / mistral: bare JSON
    objects = obj if isinstance(obj, list) else [obj]
    calls = [_from_object(o) for o in objects]
    if objects and all(calls):
        return "", calls
    return text, []


FUNCTION = re.compile(r"<tool_call>\s*<function=([^\s<>]+)>(.*?)</function>\s*</tool_call>", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^\s<>]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def _parse_functions(text: str) -> tuple[str, list[dict]]:
    """Qwen3.5's calls: <function=name> blocks of <parameter=key> values (JSON where they parse, else text)."""
    calls = []
    for name, body in FUNCTION.findall(text):
        arguments = {}
        for key, value in PARAMETER.findall(body):
            parsed = _json(value)
            arguments[key] = value if parsed is None else parsed
        calls.append(_call(name, arguments))
    return (text[: text.find("<tool_call>")].strip(), calls) if calls else (text, [])


def _parse_actions(text: str) -> tuple[str, list[dict]]:
    calls = []
    for name, body in ACTION.findall(text):
        obj = _json(body.strip().strip("`"))
        if not isinstance(obj, dict):
            return text, []
        calls.append(_call(name, obj))
    return (text[: text.find("Action:")].strip(), calls) if calls else (text, [])


def _from_object(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json(arguments) if _json(arguments) is not None else arguments
    return _call(obj["name"], arguments)


def _call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"name": name, "arguments": text}


def _json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def openai_tool_calls(calls: list[dict], seed: str) -> list[dict]:
    """OpenAI's `tool_calls` list; ids derive from the request, not the clock or a random source."""
    return [{"id": "call_" + uuid.uuid5(uuid.NAMESPACE_URL, f"{seed}/{i}").hex[:24], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}} for i, call in enumerate(calls)]
