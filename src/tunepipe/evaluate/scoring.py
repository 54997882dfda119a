"""Scoring text with a trained reward model: `tunepipe score CONFIG.yaml --text ...` and
`score_texts` for library use.

Kept apart from train/preference/rm.py so that the train stage does not depend on inference code.
The reward of a text is the value head's output at its last token, as in training.
"""

from __future__ import annotations

import json

import torch

from tunepipe.errors import TunepipeError
from tunepipe.models.base import load_reward_model


def as_text(tokenizer, item) -> str:
    """A string is scored as given; a conversation (list of {role, content}) is rendered with
    the chat template first, as the training rows were."""
    if isinstance(item, str):
        return item
    return tokenizer.apply_chat_template(item, tokenize=False)


@torch.no_grad()
def score_texts(model, tokenizer, items: list, batch_size: int = 8, max_length: int | None = None) -> list[float]:
    """The reward model's scalar score for each text or conversation in `items`.

    `max_length`: texts longer than this many tokens are cut to their head first (as
    LLaMA-Factory's `/v1/score/evaluation` does), so the score is read at the cut."""
    scores: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        texts = [as_text(tokenizer, item) for item in items[start:start + batch_size]]
        # The templates carry their own special tokens; training rows were encoded the same way.
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt",
                          truncation=max_length is not None, max_length=max_length).to(device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores.extend(logits.squeeze(-1).float().cpu().tolist())
    return scores


def score_command(args) -> int:
    """`tunepipe score CONFIG.yaml --text T [--text T2 ...]`: print one score per text.

    A `--text` that is a JSON list of messages is rendered with the chat template.
    """
    from tunepipe.config.loader import load_config
    from tunepipe.layout import Layout
    from tunepipe.models.trained import (
        base_dir_for,
        quantization_config,
        require_trained,
        tokenizer_for,
        trained_source,
    )

    cfg = load_config(args.config, args.overrides)
    if not args.text:
        raise TunepipeError("tunepipe score: give at least one --text to score")
    layout = Layout.at(cfg.train.output_dir)
    source = require_trained(trained_source(cfg, layout), cfg, layout)
    base_dir = base_dir_for(cfg, layout)
    quantization = quantization_config(cfg) if cfg.model.quantization_bit else None
    tokenizer = tokenizer_for(cfg, base_dir, source)
    model = load_reward_model(source.paths[-1], base_dir, tokenizer.pad_token_id, cfg.model.dtype, quantization)
    items = [parse_text_arg(text) for text in args.text]
    for item, score in zip(items, score_texts(model, tokenizer, items)):
        shown = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
        print(f"{score:+.4f}\t{shown}")
    return 0


def parse_text_arg(text: str):
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                           for m in value):
            return value
    return text
