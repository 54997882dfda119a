"""`stage: rm`: a reward model (scoring text with it lives in tunepipe/scoring.py).

The reward model is the base with a scalar value head: transformers'
`AutoModelForSequenceClassification` with one label, built from the causal LM
checkpoint (the head is new; with LoRA it is trained in full and saved with the
adapter as a `modules_to_save` module). The reward of a sequence is the head's output
at its last token; the pairwise loss is -log sigmoid(r_chosen - r_rejected).

Training runs through TRL's RewardTrainer: unlike TRL's DPO and KTO trainers it takes
pre-tokenized `chosen_ids` / `rejected_ids` columns as they are, so our shards need
only a column rename. It adds the same `rewards/*` metrics the other objectives log.
"""

from __future__ import annotations

import dataclasses
import logging

from trl import RewardTrainer

from tunepipe.config import Config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import load_tokenizer
from tunepipe.train.batches.tokenized import load_tokenized
from tunepipe.train.model.model_setup import upcast_trainable
from tunepipe.train.preference.common import add_objective_metrics, reward_metrics
from tunepipe.train.preference.data import PREFERENCE_COLUMNS
from tunepipe.train.session import run_session
from tunepipe.train.trainer_setup import optimizer_for

log = logging.getLogger(__name__)


def train(cfg: Config, layout: Layout) -> dict:
    """Train the reward model on the preference shards; returns metrics/train.json."""
    splits = load_tokenized(layout, cfg.train.stage, PREFERENCE_COLUMNS)
    if splits.meta.get("added_tokens") or cfg.model.resize_vocab:
        raise TunepipeError(f"stage rm with new tokens ({', '.join(splits.meta.get('added_tokens') or [])}): the "
                            "reward model does not resize its embeddings yet",
                            hint="add tokens with stage sft / pt / dpo / kto, or drop add_tokens / the template "
                                 "that adds them")
    tokenizer = load_tokenizer(layout.base_model, trust_remote_code=cfg.model.trust_remote_code)
    model = build_reward_model(cfg, layout, tokenizer.pad_token_id)
    train_rows = reward_dataset(splits.train)
    eval_rows = reward_dataset(splits.eval) if splits.eval is not None else None
    built = []

    def make_trainer(args, callbacks):
        built.append(RewardModelTrainer(
            model=model, args=reward_config(args), train_dataset=train_rows, eval_dataset=eval_rows,
            processing_class=tokenizer, callbacks=callbacks, optimizers=(optimizer_for(model, cfg.train), None)))
        return built[-1]

    summary = run_session(cfg, layout, model, tokenizer, eval_rows is not None, make_trainer)
    return add_objective_metrics(layout, summary, built[-1])


def reward_config(args):
    """The session's TrainingArguments as TRL's RewardConfig, every field carried over.

    RewardConfig's own defaults differ (bf16 and gradient checkpointing on, dropout off);
    the user's config decides those here. No length filter: the tokenizer already applied
    cutoff_len."""
    from transformers import TrainingArguments
    from trl import RewardConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return RewardConfig(**values, max_length=None, disable_dropout=False)


def reward_dataset(dataset):
    """Our preference shard as RewardTrainer's tokenized columns (labels are not used: the
    reward scores the whole sequence, prompt included)."""
    dataset = dataset.remove_columns([c for c in ("chosen_labels", "rejected_labels") if c in dataset.column_names])
    return dataset.rename_columns({"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"})


class RewardModelTrainer(RewardTrainer):
    """TRL's RewardTrainer, also logging rewards/chosen, rejected, margins, accuracies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # TRL casts a quantized model's trainable weights to bfloat16; tunepipe keeps trained
        # weights in float32 as model_setup does for every objective (and the value head must
        # match the precision of the hidden states it reads).
        upcast_trainable(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        chosen, rejected = outputs.logits.squeeze(-1).detach().chunk(2)
        for name, (total, count) in reward_metrics(chosen, rejected).items():
            self._metrics[mode][name].append(total / max(count, 1))
        for duplicate in ("accuracy", "margin"):  # TRL's names for rewards/accuracies, rewards/margins
            self._metrics[mode].pop(duplicate, None)
        return (loss, outputs) if return_outputs else loss


def build_reward_model(cfg, layout, pad_token_id: int):
    """The base as a one-label sequence classifier (new value head), with `finetuning_type`
    applied: LoRA trains the head in full (PEFT's SEQ_CLS saves it with the adapter),
    freeze trains the head besides the chosen layers, full trains everything."""
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from tunepipe.models.base import base_dtype, follow_manifest, torch_dtype
    from tunepipe.train.model.model_setup import (
        apply_finetuning,
        attention_implementation,
        base_config,
        quantization_config,
    )

    set_seed(cfg.train.seed)  # the head's random init must be the same on a resumed run
    quantized = cfg.model.quantization_bit is not None
    config = base_config(cfg, layout)
    kwargs = {"attn_implementation": attention_implementation(cfg.model, config)}
    if quantized:
        kwargs["quantization_config"] = quantization_config(cfg.model, cfg.train)
    try:
        with suppress_seqcls_warning():  # "score.weight newly initialized" is the point here
            model = AutoModelForSequenceClassification.from_pretrained(
                str(follow_manifest(layout.base_model)), num_labels=1, use_safetensors=True,
                dtype=torch_dtype(base_dtype(layout.base_model)), trust_remote_code=cfg.model.trust_remote_code,
                **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise TunepipeError(f"stage rm: transformers has no sequence-classification (reward) head for "
                            f"{type(config).__name__} models", hint="train the reward model on another "
                            "architecture, or use stage dpo / kto, which need no value head") from None
    model.config.pad_token_id = pad_token_id  # the head reads the last non-pad token
    model.config.use_cache = False
    model = apply_finetuning(model, cfg.train, quantized=quantized, task_type="SEQ_CLS")
    if cfg.train.finetuning_type == "freeze":
        for param in value_head(model).parameters():
            param.data = param.data.float()  # trained weights stay float32, as model_setup keeps them
            param.requires_grad_(True)
    return model


def value_head(model):
    """The classification head of a transformers sequence classifier (`score` or `classifier`)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise TypeError(f"{type(model).__name__} has no score / classifier head")
