"""The Ollama `Modelfile` written beside an export: chat template as a Go template, stop tokens.

`ollama create NAME -f Modelfile`, run inside the export dir, imports the safetensors
(`FROM .`) and chats with the same prompt format the model was tuned on. The Go
template is built from `chat_format.turn_format`, which checks that its per-role parts
reproduce the jinja template exactly; a template it cannot describe gets no TEMPLATE
line (Ollama then falls back to its own detection) and a comment saying so.
"""

from __future__ import annotations

from tunepipe.data.chat.chat_format import TurnFormat, stop_token_ids, turn_format

MODELFILE = "Modelfile"


def _literal(text: str) -> str:
    # Go templates read "{{" as an action; emit braces through a string action instead.
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: TurnFormat) -> str:
    """One line on purpose: Go's `{{-` trimming would also eat the newlines the parts contain."""
    return (
        "{{ if .System }}" + _literal(fmt.system_prefix) + "{{ .System }}" + _literal(fmt.system_suffix)
        + "{{ end }}{{ range .Messages }}{{ if eq .Role \"user\" }}" + _literal(fmt.user_prefix)
        + "{{ .Content }}" + _literal(fmt.user_suffix) + "{{ else if eq .Role \"assistant\" }}"
        + "{{ .Content }}" + _literal(fmt.assistant_suffix) + "{{ end }}{{ end }}"
    )


def _quoted_block(text: str) -> str | None:
    return None if '"""' in text else f'"""{text}"""'


def modelfile_text(tokenizer, generation_config=None, source: str = ".") -> tuple[str, bool]:
    """The Modelfile, and whether it carries the chat template. `source`: `.` (the safetensors) or
    `./model-<type>.gguf` (export.export_gguf)."""
    lines = ["# Ollama Modelfile written by tunepipe. In this folder: ollama create NAME -f Modelfile",
             f"FROM {source}"]
    fmt = turn_format(tokenizer) if tokenizer.chat_template else None
    template = _quoted_block(go_template(fmt)) if fmt else None
    if template:
        lines.append(f"TEMPLATE {template}")
        if fmt.default_system and _quoted_block(fmt.default_system):
            lines.append(f"SYSTEM {_quoted_block(fmt.default_system)}")
    else:
        lines.append("# the chat template could not be written as a Go template; Ollama will use its own")
    for token_id in stop_token_ids(tokenizer, generation_config):
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token and '"' not in token:
            lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n", template is not None
