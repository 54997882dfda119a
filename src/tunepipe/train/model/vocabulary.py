"""New tokens, model side: resize the embeddings (and LM head), initialise the new rows, train them.

The tokenize stage grew the tokenizer (`data/vocabulary.py`) and listed the new tokens in the
shards' meta. Here the model follows, as LLaMA-Factory's `resize_embedding_layer` does:
transformers' `resize_token_embeddings` (padded to a multiple of 64, without its mean
resizing) makes the room; each new token's row then starts as `init_special_tokens` says:

- noise_init: the mean of the other rows plus Gaussian noise of std 1/sqrt(hidden);
- desc_init: the mean of the rows of its description's tokens (`new_special_tokens_config`);
- desc_init_w_noise: that mean plus the same noise.

transformers has no initialisation from descriptions, so these few lines are ours. With LoRA /
OFT the input and output embedding modules are trained in full and saved with the adapter
(PEFT modules_to_save), so the adapter carries the new rows; evaluation, export and chat
load the grown tokenizer saved beside it and resize the base the same way
(`tunepipe.models.base.resize_embeddings`) before applying it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

from tunepipe.config import Config, TrainConfig
from tunepipe.config.checks import name_list
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import read_json
from tunepipe.layout import Layout
from tunepipe.models.base import load_tokenizer, resize_embeddings

log = logging.getLogger(__name__)


@dataclass
class NewTokens:
    """What the tokenize stage recorded: the tokens it added and their descriptions."""

    tokens: list[str] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)


def new_tokens(layout: Layout) -> NewTokens:
    meta_path = layout.tokenized / "meta.json"  # absent when a model is built without shards
    meta = (read_json(meta_path) or {}) if meta_path.is_file() else {}
    return NewTokens(list(meta.get("added_tokens") or []), dict(meta.get("token_descriptions") or {}))


def training_tokenizer(cfg: Config, layout: Layout):
    """The tokenizer the shards were made with: the grown one when tokens were added, else the base's."""
    grown = layout.grown_tokenizer
    source = grown if (grown / "tokenizer_config.json").is_file() else layout.base_model
    return load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)


def grow_vocabulary(model, cfg: Config, layout: Layout) -> TrainConfig:
    """Resize and initialise for the shards' new tokens (or `resize_vocab`); returns the train
    config whose adapters also train the embedding modules when the vocabulary changed."""
    added = new_tokens(layout)
    if not added.tokens and not cfg.model.resize_vocab:
        return cfg.train
    if cfg.model.quantization_bit is not None:
        raise TunepipeError(f"model.quantization_bit={cfg.model.quantization_bit} with new tokens "
                            f"({', '.join(added.tokens) or 'resize_vocab'}): quantized embeddings cannot be resized",
                            hint="train in 16 / 32 bits (drop quantization_bit) to add tokens")
    tokenizer = training_tokenizer(cfg, layout)
    resize_embeddings(model, len(tokenizer))
    inherited = merged_vocabulary(cfg)  # create_new_adapter: rows the merged adapters already trained
    ids = [tokenizer.convert_tokens_to_ids(token) for token in added.tokens if token not in inherited]
    method = cfg.model.init_special_tokens
    if method != "noise_init" and not added.descriptions:
        log.warning("model.init_special_tokens=%s needs new_special_tokens_config descriptions; using noise_init "
                    "(as LLaMA-Factory does)", method)
        method = "noise_init"
    if ids:
        initialise_rows(model, tokenizer, ids, method, added.descriptions)
        log.info("new tokens %s: embedding rows %s initialised by %s", ", ".join(added.tokens), ids, method)
    if not cfg.train.uses_adapter:
        return cfg.train
    modules = name_list(cfg.train.additional_target) + [m for m in embedding_module_names(model)
                                                        if m not in name_list(cfg.train.additional_target)]
    return replace(cfg.train, additional_target=modules)


def merged_vocabulary(cfg: Config) -> set[str]:
    """Tokens of the adapters `create_new_adapter` merged in that were trained with new tokens."""
    from tunepipe.models.trained import adapter_dir, grown_tokenizer_dir

    if not cfg.train.create_new_adapter:
        return set()
    grown = [grown_tokenizer_dir(adapter_dir(name, quiet=True, model_cfg=cfg.model)) for name in cfg.model.adapters()]
    return {token for path in grown if path is not None for token in load_tokenizer(path).get_vocab()}


def embedding_module_names(model) -> list[str]:
    """Short names (PEFT modules_to_save) of the input and output embedding modules."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and module in wanted]


def initialise_rows(model, tokenizer, ids: list[int], method: str, descriptions: dict[str, str]) -> None:
    import torch

    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            start = rows_from_descriptions(weight, tokenizer, ids, descriptions) if method != "noise_init" else None
            if start is None:
                keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
                keep[ids] = False
                start = weight[keep].mean(dim=0, keepdim=True).expand(len(ids), -1)
            if method != "desc_init":
                noise = torch.randn(len(ids), weight.shape[1], dtype=weight.dtype, device=weight.device)
                start = start + noise / math.sqrt(weight.shape[1])
            weight[ids] = start.to(weight.dtype)


def rows_from_descriptions(weight, tokenizer, ids: list[int], descriptions: dict[str, str]):
    """Per new token: the mean row of its description's tokens (old tokens only); a token without
    a usable description gets the mean of the other rows, as in LLaMA-Factory."""
    import torch

    new = set(ids)
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[ids] = False
    fallback = weight[keep].mean(dim=0)
    rows = []
    for token_id in ids:
        text = descriptions.get(tokenizer.convert_ids_to_tokens(token_id), "")
        known = [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i not in new] if text else []
        rows.append(weight[known].mean(dim=0) if known else fallback)
    return torch.stack(rows)
