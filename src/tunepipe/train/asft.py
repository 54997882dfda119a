"""The reference distribution of ASFT (LLaMA-Factory's `use_asft_loss` / `asft_alpha`).

ASFT (Anchored Supervised Fine-Tuning) is DFT plus `asft_alpha` x KL(reference || model) of each
trained position's next-token distribution: the reference keeps DFT's reweighted updates from
drifting. `loss.causal_lm_loss` computes the loss; this module gives it the reference's side:
the final hidden states (fused with its output head, chunk by chunk) or, for heads that are not
a plain Linear, its logits at the trained positions.

The reference is the one DPO / KTO use (`preference.common.Reference`): the policy with its
adapter disabled for LoRA / OFT (no second copy of the weights), a frozen copy of the starting
weights for full / freeze fine-tuning, or `train.ref_model` (+ `ref_model_adapters`) when set.
LLaMA-Factory loads the base model again for every method (and has no reference with LoRA).
"""

from __future__ import annotations

import torch

from tunepipe.errors import TunepipeError
from tunepipe.train.batches.collate import model_inputs
from tunepipe.train.loss import label_hidden_states, plain_output_head
from tunepipe.train.preference.common import Reference, build_reference, peft_model_of


class ReferenceAnchor:
    """The frozen reference ASFT's KL term compares the model with, and its weight `alpha`."""

    def __init__(self, reference: Reference, alpha: float):
        self.reference, self.alpha = reference, alpha

    def _frozen_on(self, device: torch.device) -> torch.nn.Module:
        frozen = self.reference.frozen
        if next(frozen.parameters()).device != device:  # the Trainer moved only the policy
            frozen.to(device)
        return frozen

    def _run(self, model, batch: dict, forward):
        """forward(reference model) under no_grad, the adapter disabled for the adapter_off kind."""
        with torch.no_grad():
            if self.reference.kind == "adapter_off":
                peft_model = peft_model_of(model)
                with peft_model.disable_adapter():
                    return forward(peft_model)
            return forward(self._frozen_on(batch["input_ids"].device))

    def output_head(self, model) -> torch.nn.Linear | None:
        """The reference's plain output projection (None: let it apply its own head)."""
        if self.reference.kind == "adapter_off":
            return plain_output_head(peft_model_of(model))  # the base's head (None if LoRA wraps it)
        return plain_output_head(self.reference.frozen)

    def hidden_states(self, model, batch: dict, selected: torch.Tensor) -> torch.Tensor:
        return self._run(model, batch, lambda ref: label_hidden_states(ref, batch, selected))

    def logits(self, model, batch: dict, selected: torch.Tensor) -> torch.Tensor:
        return self._run(model, batch, lambda ref: ref(**model_inputs(batch), logits_to_keep=selected).logits)


def reference_anchor(cfg, model) -> ReferenceAnchor | None:
    """The ASFT anchor for `model` at step 0, or None without `use_asft_loss`."""
    train = cfg.train
    if not train.use_asft_loss:
        return None
    if train.ref_model:
        from tunepipe.train.preference.ref_model import load_reference_model

        reference = Reference("ref_model", load_reference_model(cfg))
        check_same_vocabulary(model, reference.frozen, train.ref_model)
    else:
        reference = build_reference(model, train)
    return ReferenceAnchor(reference, train.asft_alpha)


def check_same_vocabulary(model, reference, name: str) -> None:
    ours, theirs = model.get_output_embeddings(), reference.get_output_embeddings()
    if ours.weight.shape[0] != theirs.weight.shape[0]:
        raise TunepipeError(f"train.ref_model={name!r}: its vocabulary has {theirs.weight.shape[0]} tokens, "
                            f"the trained model's {ours.weight.shape[0]}: ASFT compares their next-token "
                            "distributions token by token", hint="use a reference with the same tokenizer")
