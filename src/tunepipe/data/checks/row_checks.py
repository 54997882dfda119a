"""Row checks: the JSON Schemas, then the semantic rules a schema cannot express.

Semantic rules (LLaMA-Factory's, plus the ones that otherwise crash training later):
sharegpt turns alternate user/observation (odd positions) and assistant/function_call
(even positions) after an optional leading system turn; an SFT / KTO conversation ends
with the assistant answer that is trained, a preference prompt ends with the turn the
answers reply to; answers are not empty; chosen differs from rejected; `tools` and
function calls parse as JSON.
"""

from __future__ import annotations

import json
from typing import Any

from tunepipe.data.checks.schemas import load_validator, pointer
from tunepipe.data.sources.formats import Mapper

ODD_ROLES = ("user", "observation")
EVEN_ROLES = ("assistant", "function_call")
MAX_MESSAGE = 300

Problem = tuple[list, str]  # (path in the view, message)


def check_view(mapper: Mapper, view: dict) -> list[Problem]:
    """Every problem with one row's view; empty when the row is valid."""
    validators = [load_validator(name) for name in mapper.schemas]
    if not all(v.is_valid(view) for v in validators):  # fast path first: is_valid is cheap
        return [schema_problem(mapper, error) for v in validators for error in v.iter_errors(view)]
    if mapper.kind == "pretrain":
        return [] if view["text"].strip() else [(["text"], "the text is empty (only whitespace)")]
    if mapper.chat:
        return chat_problems(mapper, view)
    return alpaca_problems(mapper, view)


def schema_problem(mapper: Mapper, error) -> Problem:
    import jsonschema_rs

    path = list(error.instance_path)
    kind = error.kind
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
        missing = kind.property
        if not path:
            if mapper.kind == "pretrain":
                column = mapper.entry.columns["messages" if mapper.chat else "prompt"]
                return [], f"missing the text: column {column!r} is absent or holds no text"
            return [], f"missing column {mapper.entry.columns.get(missing, missing)!r} ({missing})"
        return path, f"missing {mapper.raw_name(missing)!r}"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Enum) and path and path[-1] == "role":
        tags = ", ".join(f"{raw!r} ({role})" for raw, role in mapper.role_names.items())
        return path, (f"unknown role {short(error.instance)}: this dataset's role tags are {tags}; "
                      "set \"tags\" in dataset_info.json if the file uses other names")
    return path, short_message(error.message)


def alpaca_problems(mapper: Mapper, view: dict) -> list[Problem]:
    problems = []
    if not (view.get("prompt") or view.get("query")):
        problems.append((["prompt"], "empty instruction: both the prompt and the query are empty"))
    if mapper.kind == "preference":
        problems += answer_problems(view["chosen"], view["rejected"], ["chosen"], ["rejected"])
    elif not view["response"].strip():
        problems.append((["response"], "empty response: there is nothing to train on"))
    problems += tools_problems(view)
    return problems


def chat_problems(mapper: Mapper, view: dict) -> list[Problem]:
    messages = view["messages"]
    turns = turn_list(messages, mapper.entry.formatting == "openai")
    problems = [((["messages", i, "role"]), msg) for i, msg in order_problems(mapper, turns)]
    if problems:
        return problems
    if mapper.kind == "preference":
        missing = [side for side in ("chosen", "rejected") if not isinstance(view.get(side), dict)]
        if missing:  # the openai schema leaves them optional (it also describes SFT rows)
            return [([], f"missing column {mapper.entry.columns.get(side, side)!r} ({side})") for side in missing]
        if len(turns) % 2 == 0:
            problems.append((["messages"], ("a preference conversation must end with the user (or observation) "
                                           "turn that chosen and rejected answer")))
        problems += answer_problems(view["chosen"].get("content"), view["rejected"].get("content"),
                                    ["chosen", "content"], ["rejected", "content"])
    else:
        if len(turns) % 2 == 1:
            index = turns[-1][1]
            problems.append(((["messages", index, "role"]), ("the conversation must end with an assistant "
                                                             "(or function_call) turn: the answer that is trained")))
        elif not _text(messages[turns[-1][1]]).strip() and not messages[turns[-1][1]].get("tool_calls"):
            problems.append(((["messages", turns[-1][1], "content"]), "empty final answer: nothing to train on"))
    problems += call_problems(messages, turns)
    problems += tools_problems(view)
    return problems


def turn_list(messages: list[dict], openai: bool) -> list[tuple[str, int]]:
    """(role, index in messages) of each turn after a leading system message; an OpenAI
    assistant turn with tool_calls is a function_call, and consecutive tool results are one turn."""
    turns: list[tuple[str, int]] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if index == 0 and role == "system":
            continue
        if openai and message.get("tool_calls") and role == "assistant":
            role = "function_call"
        if openai and role == "observation" and turns and turns[-1][0] == "observation":
            continue
        turns.append((role, index))
    return turns


def order_problems(mapper: Mapper, turns: list[tuple[str, int]]) -> list[tuple[int, str]]:
    raw = {role: name for name, role in mapper.role_names.items()}
    for position, (role, index) in enumerate(turns):
        expected = ODD_ROLES if position % 2 == 0 else EVEN_ROLES
        if role not in expected:
            names = " or ".join(f"{raw.get(r, r)!r} ({r})" for r in expected)
            return [(index, (f"turn {position + 1} has role {raw.get(role, role)!r} ({role}) where {names} was "
                            "expected: turns alternate user/observation, then assistant/function_call"))]
    return []


def answer_problems(chosen: Any, rejected: Any, chosen_path: list, rejected_path: list) -> list[Problem]:
    problems = []
    for value, path in ((chosen, chosen_path), (rejected, rejected_path)):
        if not isinstance(value, str) or not value.strip():
            problems.append((path, "empty answer"))
    if not problems and chosen == rejected:
        problems.append((rejected_path, "chosen and rejected are the same answer: nothing to prefer"))
    return problems


def call_problems(messages: list[dict], turns: list[tuple[str, int]]) -> list[Problem]:
    problems = []
    for role, index in turns:
        message = messages[index]
        if role != "function_call" or message.get("tool_calls"):
            continue
        try:
            call = json.loads(_text(message))
        except json.JSONDecodeError as exc:
            problems.append((["messages", index, "content"], (f"a function call must be JSON: {exc.msg} "
                                                             f"at column {exc.colno}")))
            continue
        calls = call if isinstance(call, list) else [call]
        if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
            problems.append((["messages", index, "content"],
                             "a function call must be a JSON object with a \"name\" (or a list of them)"))
    return problems


def tools_problems(view: dict) -> list[Problem]:
    tools = view.get("tools")
    if not isinstance(tools, str) or not tools.strip():
        return []
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError as exc:
        return [(["tools"], f"tools must be JSON: {exc.msg} at column {exc.colno}")]
    if not isinstance(parsed, (list, dict)):
        return [(["tools"], "tools must be a JSON list of tool definitions (or one object)")]
    return []


def _text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def short_message(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def problem_record(mapper: Mapper, data: Any, problem: Problem) -> dict:
    """A problem as reported: a JSON pointer into the user's own row, and the message."""
    path, message = problem
    return {"pointer": pointer(mapper.raw_path(path, data)), "message": message}
