"""Chat formats: a conversation as the *turns* the tokenizer encodes, one at a time.

Two sources, one rule:
- `data.template` unset: the tokenizer's own jinja chat template, rendered through the
  same sandboxed environment (and variables) as transformers' `apply_chat_template`.
  The rendered text is cut at each answer: everything before it (ending with the
  generation prompt), the answer (up to where the next prompt starts), and so on.
- `data.template: NAME`: LLaMA-Factory 0.9.5's template of that name
  (`named_templates.py`), each turn built from its role's slots.

The boundary rule (docs/architecture.md, "Turns"): every turn is tokenized on its own
and the ids are concatenated, so no token spans a prompt and its answer. At inference
the prompt is tokenized alone and the model continues from its last token; training
on a token that merges the end of the prompt with the start of the answer would teach
a sequence the model never sees. This is also what LLaMA-Factory does, so the ids match.
Where the tokenizer would not merge anything (special tokens between turns, the usual
case) the ids equal `apply_chat_template(conversation)`, which the golden tests check.

Tools, with the tokenizer's template: when it reads `tools` (Qwen2.5, Llama 3.1, ...),
definitions go in as `tools=` and calls / results as assistant `tool_calls` / `tool`
messages; when it does not (SmolLM2, ChatML) tunepipe falls back to tagged text: the
definitions in the system prompt inside <tools></tools>, each call an assistant turn
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, each result a user turn inside
<tool_response></tool_response>. Named templates use their tool format (tool_formats.py).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from tunepipe.config import DEFAULT_TEMPLATE_DATE
from tunepipe.data.chat import named_templates as nt
from tunepipe.data.chat.tool_formats import FORMATS, calls_text, tools_text
from tunepipe.data.sources.media import PLACEHOLDERS
from tunepipe.data.vision import image_parts
from tunepipe.errors import TunepipeError

log = logging.getLogger(__name__)

TRAINED_ROLES = ("assistant", "function_call")
DEFAULT_TODAY = date.fromisoformat(DEFAULT_TEMPLATE_DATE)
JINJA_TOOL_FORMATS = (None, "qwen")  # qwen: force the tagged <tool_call> text form


@dataclass
class Chat:
    """A canonical row as a jinja template sees it."""

    messages: list[dict]
    tools: list[dict] | None
    answers: list[int]  # indices of the assistant-side turns in `messages`


class ChatFormat:
    """Turn canonical rows into turns (texts and token ids), by a named template or the tokenizer's."""

    def __init__(self, tokenizer, name: str | None = None, tool_format: str | None = None,
                 today: date = DEFAULT_TODAY, default_system: str | None = None):
        self.tokenizer = tokenizer
        # data.default_system: the system prompt of rows (and chats) that bring none, in place of
        # the template's own (LLaMA-Factory's meaning)
        self.default_system = default_system or ""
        self.today = today  # data.template_date: the only date a template ever renders
        self.name = name or "tokenizer"
        self.named = nt.get_template(name) if name is not None else None
        self.added_tokens: list[str] = []
        self.media = None  # vision.MediaTokens: set by the tokenize stage for a vision-language model
        if self.named is not None:
            self.tool_format = tool_format or self.named.tool_format
            if self.tool_format not in FORMATS:
                raise TunepipeError(f"data.tool_format={tool_format!r}: not supported",
                                    hint=f"one of {', '.join(FORMATS)}, or unset for the template's own")
            self.added_tokens = nt.fix_tokenizer(tokenizer, self.named)
            if self.added_tokens:
                log.warning("template %s added %s to the tokenizer, which lacked them (as LLaMA-Factory does); "
                            "training grows the embeddings and trains their rows: prefer a model whose "
                            "tokenizer has them",
                            name, ", ".join(self.added_tokens))
            self.template = self.tool_template = nt.jinja(self.named, tokenizer)
            self.native_tools = False
        else:
            if tool_format not in JINJA_TOOL_FORMATS:
                raise TunepipeError(f"data.tool_format={tool_format!r}: not supported without data.template",
                                    hint="leave it unset to use the chat template's own tool support, "
                                         "or qwen for <tool_call> tags in the text")
            if not tokenizer.chat_template:
                raise TunepipeError("the base model's tokenizer has no chat template",
                                    hint=f"set data.template to one of {', '.join(sorted(nt.TEMPLATES))}")
            self.template = tokenizer.get_chat_template()
            self.tool_template = tokenizer.get_chat_template(None, tools=[{}])
            self.native_tools = tool_format is None and reads_tools(self.tool_template)
        # what apply_chat_template passes to templates, with the clock replaced by data.template_date
        self.variables = {**tokenizer.special_tokens_map, **clock_variables(today)}

    @property
    def efficient_eos(self) -> bool:
        return bool(self.named and self.named.efficient_eos)

    def document_end(self) -> int | str | None:
        """What ends each pretraining document: EOS (after replace_eos), or the template's
        `document_end` (Llama 3's <|end_of_text|>, while its EOS is <|eot_id|>): its id when the
        tokenizer has that token, else the text itself, tokenized with the document as
        LLaMA-Factory does (such a template adds tokens; training grows the embeddings for them)."""
        token = self.named.document_end if self.named else None
        if not token:
            return self.tokenizer.eos_token_id
        return self.tokenizer.convert_tokens_to_ids(token) if token in self.tokenizer.get_vocab() else token

    # -- turns: what the encoder tokenizes --------------------------------------------
    def turns(self, row: dict, extra: dict | None = None, history_thoughts: bool = True) -> list[list]:
        """The row (plus an optional final answer) as alternating prompt / answer turns, each a list
        of texts (tokenized one by one) and token ids. `history_thoughts=False` drops the thought
        blocks of earlier answers (reasoning templates; LLaMA-Factory does so for one-turn objectives
        and with mask_history)."""
        messages = row["messages"] + ([extra] if extra else [])
        images = self.check_media(row)
        videos = self.check_videos(row)
        if self.named is None:
            turns = [[text] for text in self.rendered_turns(row, extra)]
        else:
            if images:  # LLaMA-Factory's plugins: <image> -> the family's marker (expanded below)
                messages = [{**m, "content": m["content"].replace(PLACEHOLDERS["images"], self.media.marker())}
                            for m in messages]
            if videos:  # <video> -> start, video token, end (expanded below)
                messages = [{**m, "content": m["content"].replace(PLACEHOLDERS["videos"], self.media.video_marker())}
                            for m in messages]
            turns = named_turns(self.named, self.tool_format, messages, row.get("system") or self.default_system,
                                row.get("tools") or "", self.tokenizer, history_thoughts, self.today)
        turns = self.media.expand(turns, images) if images else turns
        return self.media.expand_videos(turns, videos) if videos else turns

    def check_media(self, row: dict) -> list[dict]:
        """The row's images, once it is sure they can go into the model (or a clear error)."""
        where = row.get("_source", "a row")
        images = row.get("images") or []
        if images and self.media is None:
            raise TunepipeError(f"{where}: the row has images but the base model is not a vision-language model",
                                hint="use a vision-language base model (Qwen2-VL, Qwen3-VL, LLaVA, Gemma 3, ...) "
                                     "or drop the images column")
        if images and self.named is not None and not self.named.vision:
            raise TunepipeError(f"{where}: the row has images but template {self.name} takes none",
                                hint=f"use one of {', '.join(n for n, t in sorted(nt.TEMPLATES.items()) if t.vision)}, "
                                     "or leave data.template unset for the model's own")
        return images

    def check_videos(self, row: dict) -> list[dict]:
        """The row's videos, once it is sure they can go into the model (or a clear error)."""
        videos = row.get("videos") or []
        if not videos:
            return videos
        where = row.get("_source", "a row")
        if self.media is None:
            raise TunepipeError(f"{where}: the row has videos but the base model is not a vision-language model",
                                hint="use a vision-language base model (Qwen2-VL, Qwen3-VL) or drop the videos column")
        if self.named is not None and not self.named.vision:
            raise TunepipeError(f"{where}: the row has videos but template {self.name} takes none",
                                hint="use template: qwen2_vl (qwen3_vl for Qwen3-VL), or leave data.template unset "
                                     "for the model's own")
        if self.media.video is None:
            raise TunepipeError(f"{where}: the row has videos but the base model takes none",
                                hint="videos train on the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
        return videos

    def rendered_turns(self, row: dict, extra: dict | None = None) -> list[str]:
        """The tokenizer template's text cut before and after every answer."""
        import jinja2

        try:
            chat = self.chat(row, extra)
            cuts = []
            for k, j in enumerate(chat.answers):
                cuts.append(self.render(chat, j, add_generation_prompt=True))
                cuts.append(self.render(chat) if k == len(chat.answers) - 1 else self.render(chat, j + 1))
            if not chat.answers or chat.answers[-1] != len(chat.messages) - 1:  # a prompt awaiting its answer
                cuts.append(self.render(chat, add_generation_prompt=True))
        except jinja2.TemplateError as exc:
            raise TunepipeError(f"{row.get('_source', 'a row')}: the {self.name} chat template failed: {exc}") from None
        pieces, done = [], ""
        for k, text in enumerate(cuts):
            if not text.startswith(done):
                what = "the prompt before" if k % 2 == 0 else "the conversation up to the end of"
                raise TunepipeError(
                    f"{row.get('_source', 'a row')}: the tokenizer's chat template renders earlier turns "
                    f"differently once later turns follow ({what} answer {k // 2 + 1} is not a prefix "
                    f"of the longer conversation), so the prompt cannot be masked",
                    hint=f"set data.template to a named template ({', '.join(sorted(nt.TEMPLATES))})")
            pieces.append(text[len(done):])
            done = text
        return pieces

    def prompt_ids(self, system: str, messages: list[dict], images: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation awaiting its next answer (chat), turn by turn as in training;
        `images`: the references of its `<image>` placeholders, in order (a vision-language model)."""
        turns = self.turns({"system": system or "", "tools": "", "messages": messages, "images": images or []})
        return [i for turn in turns for element in turn
                for i in (self.tokenizer(element, add_special_tokens=False)["input_ids"]
                          if isinstance(element, str) else [element])]

    # -- the tokenizer's jinja template ----------------------------------------------
    def render(self, chat: Chat, upto: int | None = None, add_generation_prompt: bool = False) -> str:
        messages = chat.messages if upto is None else chat.messages[:upto]
        template = self.tool_template if chat.tools else self.template
        return _compiled(template).render(messages=messages, tools=chat.tools, documents=None,
                                          add_generation_prompt=add_generation_prompt, **self.variables)

    def chat(self, row: dict, extra: dict | None = None) -> Chat:
        """Canonical row (plus an optional final answer) -> messages the jinja template understands."""
        tools = parse_tools(row.get("tools", ""))
        system = row.get("system") or self.default_system
        if tools and not self.native_tools:
            system = tools_system_prompt(system, tools)
        messages = [{"role": "system", "content": system}] if system else []
        answers = []
        for turn in row["messages"] + ([extra] if extra else []):
            if turn["role"] in TRAINED_ROLES:
                answers.append(len(messages))
            messages.append(self.message(turn, bool(row.get("images") or row.get("videos"))))
        return Chat(messages, tools if self.native_tools else None, answers)

    def message(self, turn: dict, images: bool = False) -> dict:
        role, content = turn["role"], turn["content"]
        if images and role == "user" and any(marker in content for marker in PLACEHOLDERS.values()):
            return {"role": role, "content": image_parts(content)}  # the template renders its own media markers
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


def apply_template(tokenizer, name: str | None):
    """The tokenizer as the tokenize stage used it with `data.template: name`: the template's
    tokens fixed and its jinja form as the chat template, so chat, evaluation and the export
    (tokenizer, generation stop ids, Modelfile) follow the template training saw."""
    if name is not None:
        tokenizer.chat_template = ChatFormat(tokenizer, name).template
    return tokenizer


def named_turns(template: nt.NamedTemplate, tool_format: str, messages: list[dict], system: str, tools: str,
                tokenizer, history_thoughts: bool, today: date) -> list[list]:
    """One list of texts / ids per message, as LLaMA-Factory's template of that name builds it."""
    system = system or template.default_system
    answers = [i for i, m in enumerate(messages) if m["role"] in TRAINED_ROLES]
    contents = [m["content"] for m in messages]
    if template.reasoning and not history_thoughts:
        for i in answers[:-1]:
            contents[i] = remove_thought(contents[i])
    turns = []
    for i, (message, content) in enumerate(zip(messages, contents)):
        elements, role = [], message["role"]
        if i == 0:
            elements += template.prefix
            if system or tools:
                head = system + (tools_text(tool_format, tools, today) if tools else "")
                if template.system_in_user:
                    content = nt.fill(template.slots["system"], head)[0] + content
                else:
                    elements += nt.fill(template.slots["system"], head)
        if role == "function_call":
            content = calls_text(tool_format, content, nt.THOUGHT)
        elements += nt.fill(template.slots[role], content)
        turns.append([_ids(tokenizer, e) if isinstance(e, tuple) else e for e in elements])
    if template.reasoning:
        for i in answers if history_thoughts else answers[-1:]:
            if nt.THOUGHT[0].strip() not in contents[i] and nt.THOUGHT[1].strip() not in contents[i]:
                turns[i] = [nt.THOUGHT[0] + nt.THOUGHT[1], *turns[i]]
    return turns


def clock_variables(today: date) -> dict:
    """Template variables that replace the clock: transformers gives jinja templates a
    `strftime_now(format)` global reading the current time (Llama 3.x, Granite, SmolLM3 render
    today's date with it); a render variable of the same name takes precedence over it."""
    return {"strftime_now": functools.partial(date.strftime, today)}  # a partial pickles; a lambda would not


def _ids(tokenizer, marker: tuple):
    token_id = tokenizer.bos_token_id if marker == nt.BOS else tokenizer.eos_token_id
    return token_id if token_id is not None else ""  # a missing BOS is simply left out


def remove_thought(content: str) -> str:
    pattern = re.escape(nt.THOUGHT[0]) + "(.*?)" + re.escape(nt.THOUGHT[1])
    return re.sub(pattern, "", content, flags=re.DOTALL).lstrip("\n")


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
    """Tool definitions as text, for jinja templates that do not render `tools` themselves."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    text = ("You can call the tools below. Each is described by a JSON schema:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a tool, answer with <tool_call>{\"name\": <tool name>, \"arguments\": <arguments object>}"
            "</tool_call>. Each result comes back inside <tool_response></tool_response>.")
    return f"{system}\n\n{text}" if system else text
