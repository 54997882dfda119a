"""LLaMA Pro (`use_llama_pro`): train only the blocks a block expansion inserted.

LLaMA-Factory expands a model offline (its `scripts/llama_pro.py`: after every n-th original
block it inserts a copy whose output projections are zero, so the expanded model computes
the same function), then trains with `use_llama_pro: true` and `freeze_trainable_layers` =
the number of inserted blocks. The inserted blocks sit at every `stride`-th position
(stride = layers / inserted), i.e. layers stride-1, 2*stride-1, ...; only they train: in
full for finetuning_type freeze, through adapters on their modules for lora / oft.
"""

from __future__ import annotations

import re

from tunepipe.config import TrainConfig
from tunepipe.errors import TunepipeError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def expanded_block_ids(num_layers: int, expanded: int) -> list[int]:
    """Indices of the inserted blocks of a model expanded by `expanded` blocks."""
    if expanded <= 0 or num_layers % expanded != 0:
        raise TunepipeError(f"train.freeze_trainable_layers={expanded} with use_llama_pro: the model's "
                            f"{num_layers} layers are not a multiple of it",
                            hint="set freeze_trainable_layers to the number of blocks the expansion inserted")
    stride = num_layers // expanded
    return list(range(stride - 1, num_layers, stride))


def expanded_block_modules(model, train: TrainConfig, targets: list[str]) -> list[str]:
    """Full names of the linear modules of the inserted blocks that `targets` name (or all of them)."""
    import torch

    num_layers = getattr(model.config, "num_hidden_layers", None)
    if not num_layers:
        raise TunepipeError(f"train.use_llama_pro: {type(model).__name__} has no num_hidden_layers in its config")
    wanted = {str(index) for index in expanded_block_ids(num_layers, train.freeze_trainable_layers)}
    names = []
    for name, module in model.named_modules():
        match = _LAYER_INDEX.search(f".{name}.")
        if not isinstance(module, torch.nn.Linear) or match is None or match.group(1) not in wanted:
            continue
        if targets == ["all"] or name.rsplit(".", 1)[-1] in targets:
            names.append(name)
    if not names:
        raise TunepipeError(f"train.use_llama_pro: no module of the expanded blocks matches {targets}",
                            hint="use `all`, or names of linear layers such as q_proj,v_proj")
    return names
