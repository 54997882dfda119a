"""`stage: grpo`: group relative policy optimisation with rewards you can compute.

The story: load the prompt shards (`prompt_ids` + the reference answer), build the
trainable model (LoRA / QLoRA / freeze / full, as every objective), resolve and probe the
rewards, then run TRL's GRPOTrainer inside the shared session (resume, SIGTERM, run lock,
MLflow, outputs). Per step TRL samples `num_generations` completions of each prompt,
scores them with every reward, turns each group's rewards into advantages
((r - mean) / std within the group) and takes a clipped policy-gradient step
(`loss_type`: grpo, dr_grpo, dapo, bnpo). With `beta > 0` a KL term pulls towards the
reference: the base with the LoRA adapter switched off (TRL's own PEFT path), or for full
fine-tuning a fresh copy of the base.

Batch sizes are TRL's: `per_device_train_batch_size` x `gradient_accumulation_steps` x
processes completions per optimizer step, a multiple of `num_generations` (so with 1 x 8
and num_generations 8, each step learns from one prompt's group of 8).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from tunepipe import rewards as reward_lib
from tunepipe.config import Config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import load_tokenizer
from tunepipe.train.batches.tokenized import load_tokenized
from tunepipe.train.model.model_setup import build_trainable_model, upcast_trainable
from tunepipe.train.preference.common import add_objective_metrics
from tunepipe.train.rl.trainer import PromptIdsGRPOTrainer, prompt_dataset
from tunepipe.train.session import run_session
from tunepipe.train.trainer_setup import optimizer_for

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt_ids", "label_text")


def train(cfg: Config, layout: Layout) -> dict:
    """Train the policy on the prompt shards with the configured rewards; returns metrics/train.json."""
    splits = load_tokenized(layout, cfg.train.stage, PROMPT_COLUMNS)
    tokenizer = load_tokenizer(layout.base_model, trust_remote_code=cfg.model.trust_remote_code)
    check_batch_shape(cfg)
    check_vllm(cfg.train)
    train_rows = prompt_dataset(splits.train, tokenizer)
    eval_rows = prompt_dataset(splits.eval, tokenizer) if splits.eval is not None else None
    funcs, processing = load_rewards(cfg, layout, tokenizer, train_rows)
    model = build_trainable_model(cfg, layout)
    built = []

    def make_trainer(args, callbacks):
        trainer = PromptIdsGRPOTrainer(
            model=model, reward_funcs=funcs, args=grpo_config(args, cfg.train), train_dataset=train_rows,
            eval_dataset=eval_rows, processing_class=tokenizer, reward_processing_classes=processing,
            callbacks=callbacks, optimizers=(optimizer_for(model, cfg.train), None))
        upcast_trainable(trainer.model)  # TRL casts a quantized model's trainable weights to bf16; we keep fp32
        trainer.attach_tracker(callbacks, reward_lib.file_hashes(cfg.train.reward_list(), Path.cwd()))
        built.append(trainer)
        return trainer

    summary = run_session(cfg, layout, model, tokenizer, eval_rows is not None, make_trainer)
    return add_objective_metrics(layout, summary, built[-1])


def load_rewards(cfg: Config, layout: Layout, tokenizer, train_rows) -> tuple[list, list]:
    """The rewards TRL calls (checked function wrappers, or reward models) and the tokenizer each
    reward model scores with; every function reward probed on the first training rows."""
    from tunepipe.models.base import follow_manifest, load_reward_model

    funcs, processing, probed = [], [], []
    for spec in cfg.train.reward_list():
        name, found = reward_lib.resolve(spec, Path.cwd(), cfg.train.max_completion_length)
        if isinstance(found, Path):
            model = load_reward_model(found, follow_manifest(layout.base_model), tokenizer.pad_token_id)
            model.config._name_or_path = name  # TRL names a model reward (rewards/<name>/mean) after it
            funcs.append(model)
            processing.append(tokenizer)
        else:
            funcs.append(reward_lib.checked(name, found, spec))
            processing.append(None)
            probed.append((name, funcs[-1]))
    sample = train_rows.select(range(min(2, len(train_rows))))
    reward_lib.probe(probed, sample["prompt"], sample["reference"], tokenizer)
    return funcs, processing


def grpo_config(args, train_cfg):
    """The session's TrainingArguments as TRL's GRPOConfig, every field carried over, plus the
    GRPO keys. TRL's own defaults (bf16, dropout off, ...) never override the user's config."""
    from transformers import TrainingArguments
    from trl import GRPOConfig

    ours = {"remove_unused_columns": False}  # the reward functions read the `reference` column
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return GRPOConfig(
        **{**values, **ours}, num_generations=train_cfg.num_generations, max_completion_length=train_cfg.max_completion_length,
        beta=train_cfg.beta, epsilon=train_cfg.epsilon, loss_type=train_cfg.loss_type,
        scale_rewards=train_cfg.scale_rewards, temperature=train_cfg.rl_temperature,
        reward_weights=train_cfg.reward_weights, use_vllm=train_cfg.use_vllm, vllm_mode="colocate",
        disable_dropout=False, shuffle_dataset=True,
        top_k=0, top_p=1.0)  # pure temperature sampling: the ratio TRL computes is that of the sampling policy


def check_batch_shape(cfg: Config) -> None:
    """TRL's rule, said in our keys before a model is loaded."""
    train = cfg.train
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps * train.num_processes
    if per_step % train.num_generations:
        raise TunepipeError(
            f"train.num_generations={train.num_generations}: per_device_train_batch_size x "
            f"gradient_accumulation_steps x num_processes = {per_step} completions per step must be a multiple "
            "of it (each prompt's group of completions is learned from together)",
            hint=f"e.g. gradient_accumulation_steps: {train.num_generations} with per_device_train_batch_size: 1")


def check_vllm(train_cfg) -> None:
    """vLLM generation is CUDA-only and an optional install: say so before anything loads."""
    if not train_cfg.use_vllm:
        return
    import torch
    from trl.import_utils import is_vllm_available

    if not torch.cuda.is_available():
        raise TunepipeError("train.use_vllm=true needs a CUDA GPU: vLLM does not generate on this machine",
                            hint="set use_vllm: false to generate with transformers")
    if not is_vllm_available():
        raise TunepipeError("train.use_vllm=true but vllm is not installed",
                            hint="pip install vllm (a version TRL supports), or set use_vllm: false")
