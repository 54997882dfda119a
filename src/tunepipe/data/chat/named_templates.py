"""Named chat templates (`data.template`): LLaMA-Factory 0.9.5's names, as a table of data.

Each template is a few *slots* per role: literal text with a `{{content}}` placeholder,
and the BOS / EOS markers (the tokenizer's own BOS / EOS id). The format strings,
default system prompts and stop words are those LLaMA-Factory 0.9.5 registers under
the same name (facts reproduced so that `template: qwen` means the same thing here);
the code that turns them into ids is tunepipe's (`chat_format.py` / `encoding.py`).

How a conversation becomes text, per template:
- turn 0 starts with `prefix`, then, when there is a system prompt (the row's, else the
  template's default) or tools, `system` filled with the system prompt + the tool text;
  `system_in_user` templates (Llama 2, Gemma, Mistral) put that system text at the
  start of the first user message instead;
- each user / assistant / observation / function-call turn fills its role's slots;
- `replace_eos`: the template's first stop word becomes the tokenizer's EOS token;
  stop words the tokenizer lacks are added as special tokens (LLaMA-Factory does the
  same; the model then needs those embeddings, see docs/migrating-from-llama-factory.md);
- `efficient_eos`: answers carry no EOS; one EOS ends the whole sample (trained), and
  each later prompt's first label is the EOS id (the answer before it ends there);
- `reasoning`: an answer without `<think>...</think>` gets an empty thought block,
  trained with the answer (LLaMA-Factory's default `enable_thinking: true`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunepipe.errors import TunepipeError

BOS, EOS = ("bos",), ("eos",)  # markers in a slot list: the tokenizer's BOS / EOS token id
CONTENT = "{{content}}"
THOUGHT = ("<think>\n", "\n</think>\n\n")  # an empty thought is THOUGHT[0] + THOUGHT[1]

Slots = tuple  # of str (with at most one CONTENT) and BOS / EOS markers


@dataclass(frozen=True)
class NamedTemplate:
    """One `data.template` value: the slots of each role and the knobs around them."""

    name: str
    user: Slots = (CONTENT,)
    assistant: Slots | None = None  # None: (CONTENT, EOS), or (CONTENT,) with efficient_eos
    system: Slots = (CONTENT,)
    function: Slots | None = None  # None: the assistant slots
    observation: Slots | None = None  # None: the user slots
    prefix: Slots = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False
    efficient_eos: bool = False
    system_in_user: bool = False  # the system text opens the first user message (Llama 2 style)
    tool_format: str = "default"  # see tool_formats.py
    reasoning: bool = False  # empty <think></think> blocks added to answers without one
    document_end: str | None = None  # pretraining: this token ends each document instead of EOS
    vision: bool = False  # images allowed: each <image> becomes the family's image text (data/vision.py)
    slots: dict = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        assistant = self.assistant or ((CONTENT,) if self.efficient_eos else (CONTENT, EOS))
        object.__setattr__(self, "slots", {
            "user": self.user, "assistant": assistant, "system": self.system,
            "function_call": self.function or assistant, "observation": self.observation or self.user})


def _t(name: str, **kw) -> tuple[str, NamedTemplate]:
    return name, NamedTemplate(name, **kw)


CHATML_USER = ("<|im_start|>user\n" + CONTENT + "<|im_end|>\n<|im_start|>assistant\n",)
CHATML_ANSWER = (CONTENT + "<|im_end|>\n",)
CHATML_SYSTEM = ("<|im_start|>system\n" + CONTENT + "<|im_end|>\n",)
QWEN_OBSERVATION = ("<|im_start|>user\n<tool_response>\n" + CONTENT
                    + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n",)
GEMMA_USER = ("<start_of_turn>user\n" + CONTENT + "<end_of_turn>\n<start_of_turn>model\n",)
GEMMA_ANSWER = (CONTENT + "<end_of_turn>\n",)
GEMMA_OBSERVATION = ("<start_of_turn>tool\n" + CONTENT + "<end_of_turn>\n<start_of_turn>model\n",)
LLAMA3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
LLAMA3_ASSISTANT_HEADER = LLAMA3_HEADER.format("assistant")
VICUNA_USER = ("USER: " + CONTENT + " ASSISTANT:",)  # also LLaMA-Factory's llava / llava_next
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN_CHAT = {"user": CHATML_USER, "assistant": CHATML_ANSWER, "system": CHATML_SYSTEM,
             "observation": QWEN_OBSERVATION, "tool_format": "qwen", "stop_words": ("<|im_end|>",), "replace_eos": True}

TEMPLATES: dict[str, NamedTemplate] = dict([
    _t("alpaca", user=("### Instruction:\n" + CONTENT + "\n\n### Response:\n",),
       assistant=(CONTENT, EOS, "\n\n"),
       default_system=("Below is an instruction that describes a task. "
                       "Write a response that appropriately completes the request.\n\n")),
    _t("chatml", user=CHATML_USER, assistant=CHATML_ANSWER, system=CHATML_SYSTEM,
       observation=("<|im_start|>tool\n" + CONTENT + "<|im_end|>\n<|im_start|>assistant\n",),
       stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    _t("deepseek3", user=("<｜User｜>" + CONTENT + "<｜Assistant｜>",), prefix=(BOS,)),
    _t("default", user=("Human: " + CONTENT, EOS, "\nAssistant:"), assistant=(CONTENT, EOS, "\n"),
       system=("System: " + CONTENT, EOS, "\n")),
    _t("empty", assistant=(CONTENT,)),
    _t("gemma", user=GEMMA_USER, assistant=GEMMA_ANSWER, system=(CONTENT + "\n\n",),
       observation=GEMMA_OBSERVATION, prefix=(BOS,), stop_words=("<end_of_turn>",), replace_eos=True,
       system_in_user=True),
    _t("gemma2", user=GEMMA_USER, assistant=GEMMA_ANSWER, system=(CONTENT + "\n\n",),
       observation=GEMMA_OBSERVATION, prefix=(BOS,), stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True,
       system_in_user=True),
    _t("gemma3", user=GEMMA_USER, assistant=GEMMA_ANSWER, system=(CONTENT + "\n\n",),
       observation=GEMMA_OBSERVATION, prefix=(BOS,), stop_words=("<end_of_turn>",), replace_eos=True,
       system_in_user=True, vision=True),
    _t("glm4", user=("<|user|>\n" + CONTENT + "<|assistant|>",), assistant=("\n" + CONTENT,),
       system=("<|system|>\n" + CONTENT,), function=(CONTENT,),
       observation=("<|observation|>\n" + CONTENT + "<|assistant|>",), prefix=("[gMASK]<sop>",),
       tool_format="glm4", stop_words=("<|user|>", "<|observation|>"), efficient_eos=True),
    _t("llava", user=VICUNA_USER, default_system=VICUNA_SYSTEM, vision=True),
    _t("llava_next", user=VICUNA_USER, default_system=VICUNA_SYSTEM, vision=True),
    _t("llama2", user=(BOS, "[INST] " + CONTENT + " [/INST]"), system=("<<SYS>>\n" + CONTENT + "\n<</SYS>>\n\n",),
       system_in_user=True),
    _t("llama3", user=(LLAMA3_HEADER.format("user") + CONTENT + "<|eot_id|>" + LLAMA3_ASSISTANT_HEADER,),
       assistant=(CONTENT + "<|eot_id|>",), system=(LLAMA3_HEADER.format("system") + CONTENT + "<|eot_id|>",),
       function=(CONTENT + "<|eot_id|>",),
       observation=(LLAMA3_HEADER.format("ipython") + CONTENT + "<|eot_id|>" + LLAMA3_ASSISTANT_HEADER,),
       prefix=(BOS,), tool_format="llama3", stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True,
       document_end="<|end_of_text|>"),
    _t("mistral", user=("[INST] " + CONTENT + "[/INST]",), assistant=(" " + CONTENT, EOS),
       system=(CONTENT + "\n\n",), function=("[TOOL_CALLS] " + CONTENT, EOS),
       observation=('[TOOL_RESULTS] {"content": ' + CONTENT + "}[/TOOL_RESULTS]",), prefix=(BOS,),
       tool_format="mistral", system_in_user=True),
    # PaliGemma: the images' tokens are put in front of the whole sequence (data/vision.py)
    _t("paligemma", user=(CONTENT + "\n",), system=(CONTENT + "\n",), prefix=(BOS,), system_in_user=True, vision=True),
    _t("phi", user=("<|user|>\n" + CONTENT + "<|end|>\n<|assistant|>\n",), assistant=(CONTENT + "<|end|>\n",),
       system=("<|system|>\n" + CONTENT + "<|end|>\n",), stop_words=("<|end|>",), replace_eos=True),
    _t("phi4", user=("<|im_start|>user<|im_sep|>" + CONTENT + "<|im_end|><|im_start|>assistant<|im_sep|>",),
       assistant=(CONTENT + "<|im_end|>",), system=("<|im_start|>system<|im_sep|>" + CONTENT + "<|im_end|>",),
       stop_words=("<|im_end|>",), replace_eos=True),
    _t("qwen", **QWEN_CHAT, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    _t("qwen2_vl", **QWEN_CHAT, default_system="You are a helpful assistant.", vision=True),
    _t("qwen3", **QWEN_CHAT, reasoning=True),
    _t("qwen3_vl", **QWEN_CHAT, reasoning=True, vision=True),
    _t("qwen3_vl_nothink", **QWEN_CHAT, vision=True),
    _t("qwen3_nothink", **QWEN_CHAT),
    # Qwen3.5: Qwen3-VL's turns and images, its own XML-style tool calls (tool format qwen3_5)
    _t("qwen3_5", **{**QWEN_CHAT, "tool_format": "qwen3_5"}, reasoning=True, vision=True),
    _t("qwen3_5_nothink", **{**QWEN_CHAT, "tool_format": "qwen3_5"}, vision=True),
    _t("smollm2", user=CHATML_USER, assistant=CHATML_ANSWER, system=CHATML_SYSTEM, stop_words=("<|im_end|>",),
       default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face."),
    _t("vicuna", user=VICUNA_USER, default_system=VICUNA_SYSTEM),
    _t("yi", user=CHATML_USER, assistant=CHATML_ANSWER, system=CHATML_SYSTEM, stop_words=("<|im_end|>",)),
    _t("zephyr", user=("<|user|>\n" + CONTENT, EOS, "<|assistant|>\n"), system=("<|system|>\n" + CONTENT, EOS),
       default_system="You are Zephyr, a helpful assistant."),
])


def get_template(name: str) -> NamedTemplate:
    """The named template, or an error listing every supported name."""
    if name not in TEMPLATES:
        raise TunepipeError(f"data.template={name!r}: unknown template",
                            hint=f"supported: {', '.join(sorted(TEMPLATES))}; omit `template` to use the "
                                 f"model's own chat template (the tokenizer's)")
    return TEMPLATES[name]


def fill(slots: Slots, content: str) -> list:
    """The slots with the placeholder replaced: a list of texts and BOS / EOS markers."""
    return [slot.replace(CONTENT, content, 1) if isinstance(slot, str) else slot for slot in slots]


def fix_tokenizer(tokenizer, template: NamedTemplate) -> list[str]:
    """Give the tokenizer the template's special tokens, as LLaMA-Factory does before it encodes:
    the first stop word becomes EOS with `replace_eos`, the other stop words become special
    tokens (split out of the text). Returns the tokens that were new to the vocabulary."""
    before = len(tokenizer)
    stop_words = list(template.stop_words)
    if template.replace_eos and stop_words:
        if tokenizer.eos_token != stop_words[0]:
            tokenizer.add_special_tokens({"eos_token": stop_words[0]})
        stop_words = stop_words[1:]
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if stop_words:
        tokenizer.add_special_tokens({"additional_special_tokens": stop_words},
                                     replace_extra_special_tokens=False)
    return tokenizer.convert_ids_to_tokens(list(range(before, len(tokenizer))))


def stop_words(name: str | None) -> tuple[str, ...]:
    """The stop words of `data.template` (none when it is unset: the tokenizer's template has none)."""
    return get_template(name).stop_words if name is not None else ()


def jinja(template: NamedTemplate, tokenizer) -> str:
    """The template as a Hugging Face jinja chat template (system, user and assistant turns),
    so chat, the exported tokenizer and the Ollama Modelfile render what training saw."""
    def text(slots: Slots, placeholder: str) -> str:
        parts = []
        for slot in slots:
            if isinstance(slot, str):
                head, _, tail = slot.partition(CONTENT)
                parts += [repr(head)] if head else []
                parts += [placeholder] if CONTENT in slot else []
                parts += [repr(tail)] if tail else []
            else:
                token = tokenizer.bos_token if slot == BOS else tokenizer.eos_token
                parts += [repr(token)] if token else []
        return " + ".join(parts) or "''"

    system = text(template.slots["system"], "system_message")
    out = "{{ " + text(template.prefix, "''") + " }}" if template.prefix else ""
    out += "{% set system_message = " + repr(template.default_system) + " %}"
    out += ("{% if messages and messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
            "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}")
    if not template.system_in_user:
        out += "{% if system_message %}{{ " + system + " }}{% endif %}"
    out += "{% for message in loop_messages %}{% set content = message['content'] %}"
    if template.system_in_user:
        out += ("{% if loop.first and system_message %}{% set content = " + system
                + " + content %}{% endif %}")
    out += ("{% if message['role'] == 'user' %}{{ " + text(template.slots["user"], "content") + " }}"
            "{% elif message['role'] == 'assistant' %}{{ " + text(template.slots["assistant"], "content")
            + " }}{% endif %}{% endfor %}")
    return out
