"""A one-time check that a padding-free row keeps its samples apart on a model of unknown code.

Why: padding-free batches pass no attention mask (see `collate`). Isolation then comes
from transformers' packed-sample detection in `masking_utils` (SDPA / eager) or from the
varlen kwargs reaching the attention kernel (flash attention 2, `varlen_attention`).
Every architecture shipped inside transformers does both (the families tests check them);
a model with its own code (`trust_remote_code`) may not, and would let each sample attend
to the one before it without any error. So for such a model, before training, one tiny
row of two samples runs twice with a different first sample: the second sample's logits
must not move.
"""

from __future__ import annotations

import logging

import torch

from tunepipe.errors import TunepipeError
from tunepipe.train.batches.collate import SegmentCollator, model_inputs

log = logging.getLogger(__name__)

PROBE_LENGTH = 8


def built_into_transformers(model) -> bool:
    inner = getattr(model, "get_base_model", lambda: model)()
    return type(inner).__module__.startswith("transformers.models.")


def check_sample_isolation(model, collator: SegmentCollator) -> None:
    """Raise a TunepipeError when the second sample of a row sees the first (remote code only)."""
    if built_into_transformers(model):
        return
    vocab = int(model.config.vocab_size)
    second = [{"input_ids": [(7 * i + 3) % vocab for i in range(PROBE_LENGTH)], "labels": [-100] * PROBE_LENGTH}]
    firsts = ([(5 * i + 1) % vocab for i in range(PROBE_LENGTH)], [(11 * i + 2) % vocab for i in range(PROBE_LENGTH)])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = [_second_sample_logits(model, collator, first, second, device) for first in firsts]
    finally:
        model.train(was_training)
    gap = (logits[0] - logits[1]).abs().max().item()
    if gap > 1e-3 * max(1.0, logits[0].abs().max().item()):
        raise TunepipeError(
            f"{type(model).__name__} ({collator.attn_implementation} attention) lets a sample of a padding-free "
            f"batch see the sample before it (logit change {gap:.3g}): its code neither builds masks with "
            "transformers' masking_utils nor passes varlen kwargs to attention",
            hint="use a model architecture that ships with transformers (trust_remote_code off), "
                 "or flash_attn: fa2 on a GPU if its attention takes cu_seq_lens")
    log.info("checked: %s keeps the samples of a padding-free batch apart", type(model).__name__)


def _second_sample_logits(model, collator, first: list[int], second: list[dict], device) -> torch.Tensor:
    batch = collator([{"input_ids": first, "labels": [-100] * len(first)}] + second)
    inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in model_inputs(batch).items()}
    return model(**inputs).logits[0, len(first):].float().cpu()
