"""New tokens (`add_tokens`, `add_special_tokens`, `new_special_tokens_config`), tokenizer side.

The tokenize stage adds them to the base tokenizer before anything is encoded (LLaMA-Factory
does it when it loads the tokenizer, before the template adds its own), so each new token
encodes as one id. When the vocabulary grew, the stage keeps the grown tokenizer beside the
shards (`Layout.grown_tokenizer`, `data/tokenized/tokenizer/`) and lists the new tokens (and their descriptions, for
`init_special_tokens: desc_init`) in `meta.json`: training reads both from there, resizes
the embeddings and initialises the new rows (`train/model/vocabulary.py`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tunepipe.config import ModelConfig
from tunepipe.config.checks import name_list
from tunepipe.errors import TunepipeError


def token_descriptions(model_cfg: ModelConfig) -> dict[str, str]:
    """`new_special_tokens_config`: a mapping token -> description, inline or a YAML file."""
    value = model_cfg.new_special_tokens_config
    if value is None:
        return {}
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise TunepipeError(f"model.new_special_tokens_config: {path} not found",
                                hint="a YAML file mapping each new token to its description")
        try:
            value = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise TunepipeError(f"model.new_special_tokens_config: {path} is not valid YAML: {exc}") from None
    if not isinstance(value, dict) or not value:
        raise TunepipeError(f"model.new_special_tokens_config: {model_cfg.new_special_tokens_config!r} must map "
                            "each new token to its description", hint="e.g. {'<think>': 'start of reasoning'}")
    return {str(token): str(text) for token, text in value.items()}


def special_tokens(model_cfg: ModelConfig, descriptions: dict[str, str]) -> list[str]:
    """The special tokens to add: new_special_tokens_config's keys take precedence over
    add_special_tokens (LLaMA-Factory's rule); `new_special_tokens`, the older name, adds too."""
    if descriptions:
        return list(descriptions)
    return (name_list(model_cfg.add_special_tokens) or []) + (name_list(model_cfg.new_special_tokens) or [])


def extend_tokenizer(tokenizer, model_cfg: ModelConfig) -> tuple[list[str], dict[str, str]]:
    """Add the configured tokens to `tokenizer` (plain ones first, then special ones, as
    LLaMA-Factory does); returns the tokens that were new and the descriptions."""
    descriptions = token_descriptions(model_cfg)
    before = len(tokenizer)
    plain = name_list(model_cfg.add_tokens) or []
    if plain:
        tokenizer.add_tokens(plain, special_tokens=False)
    special = special_tokens(model_cfg, descriptions)
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    return tokenizer.convert_ids_to_tokens(list(range(before, len(tokenizer)))), descriptions
