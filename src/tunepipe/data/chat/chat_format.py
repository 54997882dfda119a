"""What a chat template looks like from outside: per-role wrappers and the end-of-turn token.

Ollama cannot run a Hugging Face jinja template, and generation must stop at the
template's end-of-turn token even when it differs from `eos_token` (Llama 3's
`<|eot_id|>`). Both are derived here by rendering the tokenizer's own template around
sentinel strings and cutting the text between them, then checked by re-rendering:
a template this cannot describe exactly gives `None`, never a wrong description.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

# What a template raises on a conversation shape it refuses (jinja's raise_exception gives
# TemplateError), or on a sentinel it transforms so that it cannot be found again.
TEMPLATE_ERRORS = (ValueError, TypeError, KeyError, IndexError)
try:
    from jinja2.exceptions import TemplateError

    TEMPLATE_ERRORS = (*TEMPLATE_ERRORS, TemplateError)
except ImportError:  # jinja2 comes with transformers' chat templates; without it there are none
    pass

SYSTEM, USER, ANSWER, USER2 = "qzxSYSTEMqzx", "qzxUSERqzx", "qzxANSWERqzx", "qzxSECONDqzx"


@dataclass(frozen=True)
class TurnFormat:
    """Literal text around each turn, as the template renders it (generation prompt included)."""

    preamble: str  # written once at the very start (a BOS the tokenizer would add anyway)
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str  # ends with the assistant header: the generation prompt
    assistant_suffix: str
    default_system: str | None  # what the template inserts when no system prompt is given

    def render(self, messages: list[dict], system: str | None = None) -> str:
        """The conversation as these parts write it (what the Ollama template produces)."""
        system = system if system is not None else self.default_system
        text = self.preamble
        if system:
            text += self.system_prefix + system + self.system_suffix
        for message in messages:
            if message["role"] == "user":
                text += self.user_prefix + message["content"] + self.user_suffix
            elif message["role"] == "assistant":
                text += message["content"] + self.assistant_suffix
        return text


def _render(tokenizer, messages, generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _common_suffix(a: str, b: str) -> str:
    tail = os.path.commonprefix([a[::-1], b[::-1]])
    return tail[::-1]


def end_of_turn_token(tokenizer) -> str | None:
    """The special token that closes an assistant answer in the template, if there is one."""
    try:
        two = _render(tokenizer, _conversation(True))
    except TEMPLATE_ERRORS:  # a template that rejects a system turn or needs other fields
        return None
    after_answer = two[two.index(ANSWER) + len(ANSWER):]
    ids = tokenizer(after_answer, add_special_tokens=False)["input_ids"]
    if ids and ids[0] in set(tokenizer.all_special_ids) | _added_special_ids(tokenizer):
        return tokenizer.convert_ids_to_tokens(ids[0])
    return None


def _added_special_ids(tokenizer) -> set[int]:
    return {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}


def stop_token_ids(tokenizer, generation_config=None, stop_words: tuple[str, ...] = ()) -> list[int]:
    """Ids that end generation: the eos id(s) of generation config and tokenizer, the end-of-turn
    token, and a named template's stop words (`named_templates.NamedTemplate.stop_words`)."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]):
        if value is not None:
            ids.append(int(value))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    end = end_of_turn_token(tokenizer)
    if end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end))
    ids += [i for i in tokenizer.convert_tokens_to_ids(list(stop_words)) if i is not None]
    return list(dict.fromkeys(ids))


def _conversation(with_system: bool) -> list[dict]:
    head = [{"role": "system", "content": SYSTEM}] if with_system else []
    return head + [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER},
                   {"role": "user", "content": USER2}]


def turn_format(tokenizer) -> TurnFormat | None:
    """Cut the rendered template into per-role parts; None when they cannot reproduce it."""
    try:
        one = _render(tokenizer, _conversation(True)[:2])
        two = _render(tokenizer, _conversation(True))
        bare = _render(tokenizer, _conversation(False)[:1])
    except TEMPLATE_ERRORS as exc:
        log.info("chat template not describable per role (%s)", exc)
        return None
    preamble = _preamble(tokenizer, two)
    one, two, bare = (text[len(preamble):] for text in (one, two, bare))
    mid = one[one.index(SYSTEM) + len(SYSTEM):one.index(USER)]
    after_answer = two[two.index(ANSWER) + len(ANSWER):two.index(USER2)]
    user_prefix = _user_prefix(mid, after_answer, end_of_turn_token(tokenizer))
    parts = {"preamble": preamble, "system_prefix": one[:one.index(SYSTEM)],
             "system_suffix": mid[:len(mid) - len(user_prefix)], "user_prefix": user_prefix,
             "user_suffix": one[one.index(USER) + len(USER):],
             "assistant_suffix": after_answer[:len(after_answer) - len(user_prefix)]}
    parts["default_system"] = _default_system(bare, parts)
    candidate = TurnFormat(**parts)
    if not _reproduces(tokenizer, candidate):
        log.info("chat template is not a plain per-role wrapper; no per-role description")
        return None
    return candidate


def _preamble(tokenizer, rendered: str) -> str:
    # A BOS written once at the start (Llama 3) is added again by every runtime's tokenizer,
    # so it is kept out of the per-role parts; a BOS reused as a turn marker (ChatML-like
    # tokenizers whose bos is <|im_start|>) is part of every turn instead.
    bos = tokenizer.bos_token
    if bos and rendered.startswith(bos) and rendered.count(bos) == 1:
        return bos
    return ""


def _user_prefix(mid: str, after_answer: str, end_token: str | None) -> str:
    """The header opening a user turn: what follows a system turn and an answer alike,
    starting after the end-of-turn token, with leading newlines left to the closing turn."""
    common = _common_suffix(mid, after_answer)
    if end_token and end_token in common:
        common = common[common.rindex(end_token) + len(end_token):]
    return common.lstrip("\n")


def _default_system(bare: str, parts: dict) -> str | None:
    plain = parts["user_prefix"] + USER + parts["user_suffix"]
    if bare == plain:
        return None
    head, tail = parts["system_prefix"], parts["system_suffix"] + plain
    if bare.startswith(head) and bare.endswith(tail) and len(bare) >= len(head) + len(tail):
        return bare[len(head):len(bare) - len(tail)]
    return None


def _reproduces(tokenizer, fmt: TurnFormat) -> bool:
    for with_system in (True, False):
        conversation = _conversation(with_system)
        system = SYSTEM if with_system else None
        messages = conversation[1:] if with_system else conversation
        for count in (1, 3):
            expected = _render(tokenizer, (conversation[:1] if with_system else []) + messages[:count])
            if fmt.render(messages[:count], system=system) != expected:
                return False
    return True
