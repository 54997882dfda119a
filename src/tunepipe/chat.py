"""`tunepipe chat CONFIG.yaml`: talk to the base, base + adapter, or an exported model.

Which model: `model_name_or_path` (a base, or an export dir) plus `adapter_name_or_path`
when set, else the train output under `output_dir` when there is one (as for `eval`
and `export`). Answers stream token by token through transformers'
`TextIteratorStreamer`. The prompt is built as training built it: with `template:` set, that
named template (its system prompt, stop words and turn-by-turn tokenization), else the
tokenizer's own chat template. Decoding uses the
`eval` group's knobs (`max_new_tokens`, `do_sample`, `temperature`, `top_p`, `top_k`,
`repetition_penalty`, `skip_special_tokens`; not `num_beams`: a streamed answer is one beam).

Lines starting with `/` are commands: `/reset` forgets the conversation, `/exit` quits,
`/image PATH` (a vision-language model) attaches a picture to the next question, as
`--image PATH` does to the first: the question gets an `<image>` placeholder per picture
(as LLaMA-Factory's chat does) and the prompt is built with the family's image tokens
and pixels exactly as training built its rows (`data.vision.MediaTokens`).
Standard input may be a terminal or a pipe: each line is one user turn, so
`printf 'Who are you?\n/exit\n' | tunepipe chat cfg.yaml` works in scripts.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import dataclass, field
from typing import TextIO

from tunepipe.config import Config
from tunepipe.data.chat.chat_format import stop_token_ids
from tunepipe.data.chat.named_templates import stop_words
from tunepipe.data.chat.templates import ChatFormat, apply_template
from tunepipe.data.sources.media import PLACEHOLDERS
from tunepipe.errors import TunepipeError
from tunepipe.evaluate.generation import decoding_kwargs, sampling_kwargs
from tunepipe.models.trained import (
    base_dir_for,
    cli_config,
    device_for,
    load_trained,
    tokenizer_for,
    trained_source,
)

log = logging.getLogger(__name__)

HELP = "commands: /reset forgets the conversation, /exit quits, /image PATH attaches a picture to the next question"


@dataclass
class ChatSession:
    """A model, its tokenizer, and the conversation so far."""

    model: object
    tokenizer: object
    cfg: Config
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    media: object | None = None  # data.vision.MediaTokens of a vision-language model
    images: list[dict] = field(default_factory=list)  # the conversation's pictures, in order
    pending: list[dict] = field(default_factory=list)  # attached to the next question

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history.clear()
        self.images.clear()
        self.pending.clear()

    def attach(self, path: str) -> None:
        """Check the picture (it decodes, the model takes pictures) and hold it for the next question."""
        from pathlib import Path

        from tunepipe.data.sources.media import decode_image, file_sha256

        if self.media is None:
            raise TunepipeError(f"/image {path}: this model takes no pictures (not a vision-language model)")
        file = Path(path).expanduser().resolve()
        problem = "not found" if not file.is_file() else decode_image(file)
        if problem:
            raise TunepipeError(f"/image {path}: {problem}", hint="name a PNG / JPEG / ... file")
        self.pending.append({"path": str(file), "sha256": file_sha256(file)})

    def reply(self, text: str, out: TextIO) -> str:
        """Add the user turn, stream the answer to `out`, remember it, return it."""
        if self.pending:  # one placeholder per picture, where the text has none (LLaMA-Factory's way)
            if text.count(PLACEHOLDERS["images"]) != len(self.pending):
                text = PLACEHOLDERS["images"] * len(self.pending) + text.replace(PLACEHOLDERS["images"], "")
            self.images.extend(self.pending)
            self.pending.clear()
        self.history.append({"role": "user", "content": text})
        fmt = ChatFormat(self.tokenizer, self.cfg.data.template, today=self.cfg.data.today(),
                         default_system=self.cfg.data.default_system)
        fmt.media = self.media
        ids = fmt.prompt_ids(self.system, self.history, self.images)
        images = {}
        if self.images:
            import torch

            images = self.media.model_inputs(torch.tensor([ids]), [json.dumps({"images": self.images})])
        answer = stream_answer(self.model, self.tokenizer, ids, self.cfg, out, images)
        self.history.append({"role": "assistant", "content": answer})
        return answer


def stream_answer(model, tokenizer, ids: list[int], cfg: Config, out: TextIO, images: dict | None = None) -> str:
    """Generate after the prompt `ids` in a worker thread; write each decoded piece as soon as it arrives
    (`images`: the prompt's pixel inputs, a vision-language model's)."""
    import torch
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=cfg.eval.skip_special_tokens)
    if cfg.eval.num_beams > 1:
        log.warning("num_beams: %d: chat streams its answers, which beam search cannot; decoding one beam",
                    cfg.eval.num_beams)
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "streamer": streamer,
              "max_new_tokens": cfg.eval.max_new_tokens, "do_sample": cfg.eval.do_sample,
              "eos_token_id": stop_token_ids(tokenizer, model.generation_config, stop_words(cfg.data.template)),
              "pad_token_id": tokenizer.pad_token_id, **sampling_kwargs(cfg.eval),
              **decoding_kwargs(cfg.eval, beams=False),
              **{key: value.to(device) for key, value in (images or {}).items()}}
    worker = threading.Thread(target=_generate, args=(model, kwargs), daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        out.write(piece)
        out.flush()
    worker.join()
    return "".join(pieces).strip()


def _generate(model, kwargs: dict) -> None:
    import torch

    with torch.inference_mode():
        model.generate(**kwargs)


def load_session(cfg: Config, layout, system: str | None) -> tuple[ChatSession, str]:
    """The session, and a line describing which weights it runs."""
    base_dir = base_dir_for(cfg, layout)
    source = trained_source(cfg, layout)
    tokenizer = apply_template(tokenizer_for(cfg, base_dir, source), cfg.data.template)
    if not tokenizer.chat_template:
        raise TunepipeError(f"{base_dir}: the tokenizer has no chat template, so there is no chat format",
                            hint="chat with an instruct model, or with the export of a tuned one")
    model = load_trained(cfg, base_dir, source, device_for())
    described = {"none": f"{base_dir}", "full": f"{source.record_dir}",
                 "adapters": f"{base_dir} + " + " + ".join(str(p) for p in source.paths)}[source.kind]
    return ChatSession(model, tokenizer, cfg, system=system, media=chat_media(cfg, base_dir, tokenizer)), described


def chat_media(cfg: Config, base_dir, tokenizer):
    """A vision-language model's image tokens and processor (pictures by absolute path, under the
    `data` group's pixel budget, as in training); None for a text model."""
    from pathlib import Path

    from tunepipe.data.vision import MediaTokens
    from tunepipe.models.base import follow_manifest, is_vision_model

    model_dir = follow_manifest(base_dir)
    if not is_vision_model(model_dir):
        return None
    return MediaTokens.load(model_dir, tokenizer, Path("/"), cfg.data.image_max_pixels, cfg.data.image_min_pixels)


def repl(session: ChatSession, lines: TextIO, out: TextIO, interactive: bool) -> int:
    """Read user turns until /exit or end of input; returns the number of answers given."""
    answers = 0
    while True:
        if interactive:
            out.write("\nUser: ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/image "):
            try:
                session.attach(text[len("/image "):].strip())
            except TunepipeError as exc:  # a mistyped path must not end the conversation
                out.write(f"error: {exc}\n")
                continue
            out.write(f"(picture attached to the next question: {session.pending[-1]['path']})\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text}; {HELP}\n")
            continue
        out.write("Assistant: ")
        session.reply(text, out)
        out.write("\n")
        out.flush()
        answers += 1
    return answers


def chat_command(args) -> int:
    cfg, layout = cli_config(args)
    session, described = load_session(cfg, layout, args.system)
    for path in args.image or []:
        session.attach(path)
    interactive = sys.stdin.isatty()
    print(f"chatting with {described}", file=sys.stderr)
    if interactive:
        print(HELP, file=sys.stderr)
    repl(session, sys.stdin, sys.stdout, interactive)
    return 0
