"""alpaca / sharegpt / openai / preference / kto / pretrain rows -> one canonical row.

Two steps per raw row:

1. `view`: the row under logical names (prompt, response, messages with role/content,
   chosen, ...) using the entry's column and tag mapping, roles translated to
   canonical names. The JSON Schemas in `schemas/` and the semantic checks run on the
   view, so one schema serves every user's column naming; `raw_path` maps a path in
   the view back to the user's own columns for error messages.
2. `canonical`: the view as the canonical row every later stage reads
   (docs/architecture.md, "Validated rows").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunepipe.data.sources.registry import DatasetEntry

ROLES = ("system", "user", "assistant", "function_call", "observation")
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "observation",
             "function_tag": "function_call", "system_tag": "system"}
ALPACA_FIELDS = {
    "sft": ("prompt", "query", "response", "history", "system", "tools"),
    "kto": ("prompt", "query", "response", "history", "system", "tools", "kto_tag"),
    "preference": ("prompt", "query", "chosen", "rejected", "history", "system", "tools"),
}
CHAT_FIELDS = ("system", "tools", "kto_tag")
SCHEMAS = {  # (formatting, kind) -> schemas the view must satisfy
    ("alpaca", "sft"): ("alpaca_sft",), ("alpaca", "kto"): ("alpaca_sft", "kto"),
    ("alpaca", "preference"): ("alpaca_preference",),
    ("sharegpt", "sft"): ("sharegpt_sft",), ("sharegpt", "kto"): ("sharegpt_sft", "kto"),
    ("sharegpt", "preference"): ("sharegpt_preference",),
    ("openai", "sft"): ("openai",), ("openai", "kto"): ("openai", "kto"),
    ("openai", "preference"): ("openai",),
}
# logical columns a dataset file must have (in at least one row) for each kind
REQUIRED_COLUMNS = {
    ("alpaca", "sft"): ("prompt", "response"), ("alpaca", "kto"): ("prompt", "response", "kto_tag"),
    ("alpaca", "preference"): ("prompt", "chosen", "rejected"), ("alpaca", "pretrain"): ("prompt",),
    ("chat", "sft"): ("messages",), ("chat", "kto"): ("messages", "kto_tag"),
    ("chat", "preference"): ("messages", "chosen", "rejected"), ("chat", "pretrain"): ("messages",),
}


@dataclass
class Mapper:
    """How one dataset's rows are viewed, checked and converted."""

    entry: DatasetEntry
    kind: str  # sft, preference, kto, pretrain

    def __post_init__(self):
        self.chat = self.entry.formatting != "alpaca"
        cols = self.entry.columns
        if self.chat:
            tags = self.entry.tags
            self.role_tag, self.content_tag = tags["role_tag"], tags["content_tag"]
            self.role_names = {tags[t]: role for t, role in TAG_ROLES.items() if tags.get(t)}
            self.top = [(f, cols[f]) for f in ("chosen", "rejected", *CHAT_FIELDS) if f in cols]
        else:
            fields = ALPACA_FIELDS.get(self.kind, ("prompt", "query"))
            self.top = [(f, cols[f]) for f in fields if f in cols]
        self.schemas = ("pretrain",) if self.kind == "pretrain" else SCHEMAS[(self.entry.formatting, self.kind)]
        self.required = REQUIRED_COLUMNS[("chat" if self.chat else "alpaca", self.kind)]

    # -- step 1: the view -------------------------------------------------------
    def view(self, data: dict) -> dict:
        if self.chat:
            view = self._chat_view(data)
        else:
            view = {logical: data[col] for logical, col in self.top if col in data}
        if self.kind == "pretrain":
            return self._pretrain_view(view)
        return view

    def _chat_view(self, data: dict) -> dict:
        view = {}
        messages = data.get(self.entry.columns["messages"])
        if messages is not None:
            view["messages"] = [self._message(m) for m in messages] if isinstance(messages, list) else messages
        for logical, col in self.top:
            if col in data:
                value = data[col]
                view[logical] = self._message(value) if logical in ("chosen", "rejected") else value
        return view

    def _message(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return message
        out = {}
        if self.role_tag in message:
            role = message[self.role_tag]
            out["role"] = self.role_names.get(role, role) if isinstance(role, str) else role
        if self.content_tag in message:
            out["content"] = message[self.content_tag]
        if "tool_calls" in message and self.entry.formatting == "openai":
            out["tool_calls"] = message["tool_calls"]
        return out

    def _pretrain_view(self, view: dict) -> dict:
        """Stage pt reads the first prompt text (LLaMA-Factory's rule): instruction + input, or turn 1."""
        if not self.chat:
            if "prompt" not in view:
                return {}
            text = view["prompt"]
            query = view.get("query")
            if isinstance(text, str) and isinstance(query, str) and query:
                text = f"{text}\n{query}" if text else query
            return {"text": text}
        messages = view.get("messages")
        if not isinstance(messages, list):
            return {}
        first = self._first_turn(messages)
        if first is None or not isinstance(messages[first], dict) or "content" not in messages[first]:
            return {}
        return {"text": messages[first]["content"]}

    @staticmethod
    def _first_turn(messages: list) -> int | None:
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and message.get("role") == "system"):
                return i
        return None

    # -- errors: view paths back to the user's columns --------------------------
    def raw_path(self, path: list, data: Any = None) -> list:
        """['messages', 3, 'role'] -> ['conversations', 3, 'from'] for this entry."""
        if not path:
            return []
        head, rest = path[0], list(path[1:])
        if head == "text":  # pretrain view
            if not self.chat:
                return [self.entry.columns["prompt"]]
            messages = data.get(self.entry.columns["messages"]) if isinstance(data, dict) else None
            first = self._first_turn([self._message(m) for m in messages]) if isinstance(messages, list) else 0
            return [self.entry.columns["messages"], first or 0, self.content_tag]
        out = [self.entry.columns.get(head, head)]
        if self.chat and head == "messages" and rest:
            out.append(rest.pop(0))
        if self.chat and head in ("messages", "chosen", "rejected") and rest:
            key = rest.pop(0)
            out.append({"role": self.role_tag, "content": self.content_tag}.get(key, key))
        return out + rest

    def raw_name(self, logical: str) -> str:
        return {"role": self.role_tag, "content": self.content_tag}.get(logical, logical) if self.chat else logical

    # -- step 2: the canonical row ---------------------------------------------
    def canonical(self, view: dict) -> dict:
        if self.kind == "pretrain":
            return {"text": view["text"]}
        row = self._chat_canonical(view) if self.chat else self._alpaca_canonical(view)
        row["system"] = row.get("system") or ""
        row["tools"] = tools_text(view.get("tools"))
        if self.kind == "kto":
            row["kto_tag"] = view["kto_tag"]
        return row

    def _alpaca_canonical(self, view: dict) -> dict:
        messages = []
        for old_prompt, old_answer in view.get("history") or []:
            messages += [{"role": "user", "content": old_prompt}, {"role": "assistant", "content": old_answer}]
        query = [part for part in (view.get("prompt"), view.get("query")) if part]
        messages.append({"role": "user", "content": "\n".join(query)})
        row = {"messages": messages, "system": view.get("system")}
        if self.kind == "preference":
            row["chosen"] = {"role": "assistant", "content": view["chosen"]}
            row["rejected"] = {"role": "assistant", "content": view["rejected"]}
        else:
            messages.append({"role": "assistant", "content": view["response"]})
        return row

    def _chat_canonical(self, view: dict) -> dict:
        messages = chat_turns(view["messages"])
        system = view.get("system")
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        row = {"messages": messages, "system": system}
        if self.kind == "preference":
            row["chosen"] = chat_turns([view["chosen"]])[0]
            row["rejected"] = chat_turns([view["rejected"]])[0]
        return row


def chat_turns(messages: list[dict]) -> list[dict]:
    """View messages -> canonical turns: OpenAI tool_calls become function_call turns (the calls
    as JSON), consecutive tool results merge into one observation turn (joined by newlines)."""
    turns: list[dict] = []
    for message in messages:
        role, content = message["role"], message.get("content")
        if message.get("tool_calls") and role in ("assistant", "function_call"):
            calls = [call_object(call["function"]) for call in message["tool_calls"]]
            role, content = "function_call", json.dumps(calls[0] if len(calls) == 1 else calls,
                                                        ensure_ascii=False)
        if role == "observation" and turns and turns[-1]["role"] == "observation":
            turns[-1]["content"] += "\n" + (content or "")
            continue
        turns.append({"role": role, "content": content or ""})
    return turns


def call_object(function: dict) -> dict:
    """An OpenAI `function` entry as {name, arguments}, arguments parsed when they are JSON text."""
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"name": function["name"], "arguments": arguments}


def tools_text(tools: Any) -> str:
    """The canonical `tools`: JSON text, or "" for none."""
    if tools is None:
        return ""
    if isinstance(tools, str):
        return tools
    return json.dumps(tools, ensure_ascii=False)
