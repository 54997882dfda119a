"""Supervised fine-tuning and continued pretraining (`stage: sft` / `stage: pt`).

Both are next-token prediction on `input_ids` / `labels` shards (pt rows simply train on
every token); the difference lives in the tokenizer stage, so one trainer serves both.
The story: load shards, build the trainable model, pick the batch layout, train, save.
"""

from __future__ import annotations

import logging

from transformers import Trainer

from tunepipe.config import Config
from tunepipe.data.sources.media import MEDIA_STORE
from tunepipe.data.vision import MediaTokens
from tunepipe.layout import Layout
from tunepipe.models.base import follow_manifest
from tunepipe.train.asft import reference_anchor
from tunepipe.train.batches.collate import SegmentCollator
from tunepipe.train.batches.isolation import check_sample_isolation
from tunepipe.train.batches.recurrent import recurrent_layer_types, refuse_packed_rows
from tunepipe.train.batches.tokenized import load_tokenized
from tunepipe.train.loss import causal_lm_loss
from tunepipe.train.model.model_setup import build_trainable_model
from tunepipe.train.model.vision import VisionCollator
from tunepipe.train.model.vocabulary import training_tokenizer
from tunepipe.train.session import run_session
from tunepipe.train.trainer_setup import optimizer_for

log = logging.getLogger(__name__)


def train(cfg: Config, layout: Layout) -> dict:
    """Train on `data/tokenized/`, write the adapter or full model; returns metrics/train.json."""
    splits = load_tokenized(layout, cfg.train.stage, ("input_ids", "labels"))
    tokenizer = training_tokenizer(cfg, layout)  # the grown one when the shards added tokens
    model = build_trainable_model(cfg, layout)
    refuse_packed_rows(model.config, "seq_lens" in splits.train.column_names)
    if "media" in splits.train.column_names:  # a vision-language model's rows (train/model/vision.py)
        collator = VisionCollator(tokenizer.pad_token_id, media_tokens(cfg, layout, tokenizer))
    else:
        collator = batch_layout(model, tokenizer.pad_token_id)

    def make_trainer(args, callbacks):
        return CausalLMTrainer(model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
                               data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
                               optimizers=(optimizer_for(model, cfg.train), None), dft=cfg.train.use_dft_loss,
                               eaft_alpha=cfg.train.eaft_alpha if cfg.train.use_eaft_loss else None,
                               anchor=reference_anchor(cfg, model))

    return run_session(cfg, layout, model, tokenizer, splits.eval is not None, make_trainer)


def media_tokens(cfg: Config, layout: Layout, tokenizer) -> MediaTokens:
    data = cfg.data
    return MediaTokens.for_data(follow_manifest(layout.base_model), tokenizer, data, layout.tokenized / MEDIA_STORE)


def batch_layout(model, pad_token_id: int) -> SegmentCollator:
    """Every batch is padding-free: its samples are laid end to end in one row, each sample
    isolated (per-sample masks transformers builds from the restarting position ids on SDPA /
    eager, varlen boundaries on flash attention and per-sample SDPA), so
    no step computes pad tokens and no batch is padded to cutoff_len. A model whose layers
    carry a recurrent state along the row (Qwen3.5's linear attention, `batches/recurrent.py`)
    gets right-padded rows instead, one sample each."""
    attn = model.config._attn_implementation
    if recurrent_layer_types(model.config):
        log.info("%s keeps a recurrent state along each row: batches are right-padded rows, one sample each "
                 "(not padding-free)", type(model).__name__)
        return SegmentCollator(pad_token_id=pad_token_id, attn_implementation=attn, sample_boundaries=False)
    collator = SegmentCollator(pad_token_id=pad_token_id, attn_implementation=attn, flatten=True)
    check_sample_isolation(model, collator)  # a model with its own code may not keep samples apart
    return collator


class CausalLMTrainer(Trainer):
    """transformers' Trainer with `loss.causal_lm_loss` as its loss.

    The Trainer counts the trained tokens of a whole optimizer step (every accumulation
    micro-batch, every process) from `shift_labels` and passes the count as
    `num_items_in_batch`; the loss divides by it, so it is already scaled for accumulation.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, dft: bool = False, eaft_alpha: float | None = None, anchor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch
        self.dft = dft  # use_dft_loss
        self.eaft_alpha = eaft_alpha  # use_eaft_loss: its eaft_alpha, else None
        self.anchor = anchor  # use_asft_loss: asft.ReferenceAnchor, else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = causal_lm_loss(model, inputs, num_items_in_batch, self.args.label_smoothing_factor, dft=self.dft,
                              eaft_alpha=self.eaft_alpha, anchor=self.anchor)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens and DDP averages gradients
            # over processes: scale back up, as transformers does for its own loss.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss
