"""`tunepipe chat CONFIG.yaml`: talk to the base, base + adapter, or an exported model.

Which model: `model_name_or_path` (a base, or an export dir) plus `adapter_name_or_path`
when set, else the train output under `output_dir` when there is one (as for `eval`
and `export`). Answers stream token by token through transformers'
`TextIteratorStreamer`. The prompt is built as training built it: with `template:` set, that
named template (its system prompt, stop words and turn-by-turn tokenization), else the
tokenizer's own chat template. Decoding uses the
`eval` group's knobs (`max_new_tokens`, `do_sample`, `temperature`, `top_p`, `top_k`,
`repetition_penalty`, `skip_special_tokens`; not `num_beams`: a streamed answer is one beam).

Lines starting with `/` are commands: `/reset` forgets the conversation, `/exit` quits.
Standard input may be a terminal or a pipe: each line is one user turn, so
`printf 'Who are you?\n/exit\n' | tunepipe chat cfg.yaml` works in scripts.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from typing import TextIO

from tunepipe.config import Config
from tunepipe.data.chat_format import stop_token_ids
from tunepipe.data.named_templates import stop_words
from tunepipe.data.templates import ChatFormat, apply_template
from tunepipe.errors import TunepipeError
from tunepipe.evaluate.generation import decoding_kwargs, sampling_kwargs
from tunepipe.loading import base_dir_for, cli_config, device_for, load_trained, tokenizer_for, trained_source

log = logging.getLogger(__name__)

HELP = "commands: /reset forgets the conversation, /exit quits"


@dataclass
class ChatSession:
    """A model, its tokenizer, and the conversation so far."""

    model: object
    tokenizer: object
    cfg: Config
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history.clear()

    def reply(self, text: str, out: TextIO) -> str:
        """Add the user turn, stream the answer to `out`, remember it, return it."""
        self.history.append({"role": "user", "content": text})
        fmt = ChatFormat(self.tokenizer, self.cfg.data.template, today=self.cfg.data.today(),
                         default_system=self.cfg.data.default_system)
        ids = fmt.prompt_ids(self.system, self.history)
        answer = stream_answer(self.model, self.tokenizer, ids, self.cfg, out)
        self.history.append({"role": "assistant", "content": answer})
        return answer


def stream_answer(model, tokenizer, ids: list[int], cfg: Config, out: TextIO) -> str:
    """Generate after the prompt `ids` in a worker thread; write each decoded piece as soon as it arrives."""
    import torch
    from transformers import TextIteratorStreamer

    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=cfg.eval.skip_special_tokens)
    if cfg.eval.num_beams > 1:
        log.warning("num_beams: %d: chat streams its answers, which beam search cannot; decoding one beam",
                    cfg.eval.num_beams)
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "streamer": streamer,
              "max_new_tokens": cfg.eval.max_new_tokens, "do_sample": cfg.eval.do_sample,
              "eos_token_id": stop_token_ids(tokenizer, model.generation_config, stop_words(cfg.data.template)),
              "pad_token_id": tokenizer.pad_token_id, **sampling_kwargs(cfg.eval),
              **decoding_kwargs(cfg.eval, beams=False)}
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
    return ChatSession(model, tokenizer, cfg, system=system), described


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
    interactive = sys.stdin.isatty()
    print(f"chatting with {described}", file=sys.stderr)
    if interactive:
        print(HELP, file=sys.stderr)
    repl(session, sys.stdin, sys.stdout, interactive)
    return 0
