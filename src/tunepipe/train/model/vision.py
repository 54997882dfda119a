"""Training a vision-language model: which parts train, what LoRA wraps, and the image batches.

Parts (LLaMA-Factory's keys and defaults): `freeze_vision_tower: true` and
`freeze_multi_modal_projector: true` keep the vision encoder and the projector frozen,
`freeze_language_model: false` trains the language model. With LoRA, `lora_target: all`
(or a list of names) wraps only the linear layers of the parts that are not frozen, never
the output head; with full / freeze the frozen parts get `requires_grad=False`.

Batches (`VisionCollator`): rows right-padded to the longest, a 2-D attention mask, the
images' `pixel_values` / `image_grid_thw` from the family's image processor (and the
videos' `pixel_values_videos` / `video_grid_thw`, data/video.py), and no position ids: the
model computes its own 3-D rotary positions (Qwen-VL's M-RoPE, from the grids and the
mask), so each sample gets exactly the positions it has alone (tests/test_vlm_train.py and
tests/test_vlm_video.py check the losses). Padding-free rows are not used here: M-RoPE
positions of samples laid end to end are not proven to restart per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunepipe.config import TrainConfig
from tunepipe.data.vision import FAMILIES, Family, MediaTokens, family_of
from tunepipe.errors import TunepipeError
from tunepipe.train.batches.collate import IGNORE_INDEX, shifted_labels
from tunepipe.train.model.adapters import ROUTER_GATES


def model_family(model) -> Family | None:
    """The vision-language family of a (possibly PEFT-wrapped) model, None for a text model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vision_config"):
        return None
    family = family_of(getattr(config, "model_type", None))
    if family is None:
        raise TunepipeError(f"{type(model).__name__}: vision-language model type {config.model_type!r} is not "
                            "supported yet", hint=f"supported model types: {', '.join(sorted(FAMILIES))}")
    return family


def frozen_keys(family: Family, train: TrainConfig) -> tuple[str, ...]:
    keys = ()
    if train.freeze_vision_tower:
        keys += family.vision_keys
    if train.freeze_multi_modal_projector:
        keys += family.projector_keys
    if train.freeze_language_model:
        keys += family.language_keys
    return keys


def lora_targets(model, family: Family, train: TrainConfig, targets: list[str]) -> list[str]:
    """Full names of the linear layers LoRA wraps: in unfrozen parts, never the output head;
    `targets` ["all"] takes every such layer but an MoE router gate (as on a text MoE; its fused
    experts are added by `adapters.attach_lora`), else those whose name ends with one of them."""
    frozen = frozen_keys(family, train)
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
             and not any(key in name for key in frozen)
             and (name.rsplit(".", 1)[-1] not in ROUTER_GATES if targets == ["all"]
                  else name.rsplit(".", 1)[-1] in targets)]
    if not names:
        raise TunepipeError(f"train.lora_target={train.lora_target!r}: no linear layer left to wrap outside the "
                            f"frozen parts ({', '.join(frozen)})",
                            hint="unfreeze a part (freeze_language_model: false) or name other layers")
    return names


def freeze_parts(model, family: Family, train: TrainConfig) -> None:
    """full / freeze: the frozen parts' parameters stop training."""
    frozen = frozen_keys(family, train)
    for name, param in model.named_parameters():
        if any(key in name for key in frozen):
            param.requires_grad_(False)
    if not any(param.requires_grad for param in model.parameters()):
        raise TunepipeError("every part of the vision-language model is frozen: nothing would train",
                            hint="set freeze_language_model: false (or unfreeze the vision tower)")


@dataclass
class VisionCollator:
    """Right-padded rows + their images' processor inputs; see the module docstring."""

    pad_token_id: int
    media: MediaTokens

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        batch = {key: torch.full((len(rows), width), fill, dtype=torch.long)
                 for key, fill in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX),
                                   ("shift_labels", IGNORE_INDEX), ("attention_mask", 0))}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"])
            batch["labels"][i, :n] = torch.as_tensor(row["labels"])
            batch["shift_labels"][i, :n] = torch.as_tensor(shifted_labels(list(row["labels"]), [n]))
            batch["attention_mask"][i, :n] = 1
        batch.update(self.media.batch_inputs(batch["input_ids"], [row.get("media") for row in rows]))
        return batch
