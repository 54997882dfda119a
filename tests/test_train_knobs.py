"""LLaMA-Factory's Trainer knobs, each shown to change what it should (through transformers).

The optimizer's betas / epsilon and the schedule's kwargs are read off the objects the Trainer
builds; NEFTune, early stopping, keeping the best checkpoint, the first-step log and dropping the
last micro-batch are shown by short runs on the tiny model.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.train_runs import tiny_run
from tunepipe.config import Config, TrainConfig
from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train import run_train
from tunepipe.train.trainer_setup import training_arguments


def built_trainer(tmp_path, **train):
    from transformers import Trainer

    args = training_arguments(Config(train=TrainConfig(**train)), Layout.at(tmp_path), has_eval=False)
    trainer = Trainer(model=torch.nn.Linear(4, 4), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    return trainer


def test_adam_betas_and_epsilon_reach_the_optimizer(tmp_path):
    group = built_trainer(tmp_path, adam_beta1=0.5, adam_beta2=0.75, adam_epsilon=1e-6).optimizer.param_groups[0]
    assert group["betas"] == (0.5, 0.75) and group["eps"] == 1e-6
    default = built_trainer(tmp_path).optimizer.param_groups[0]
    assert default["betas"] == (0.9, 0.999) and default["eps"] == 1e-8


@pytest.mark.parametrize("kwargs", [{"num_cycles": 2}, '{"num_cycles": 2}'])
def test_lr_scheduler_kwargs_shape_the_schedule(tmp_path, kwargs):
    def lr_at_half(**extra):
        trainer = built_trainer(tmp_path, lr_scheduler_type="cosine_with_restarts", learning_rate=1.0, **extra)
        for _ in range(50):
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        return trainer.lr_scheduler.get_last_lr()[0]

    assert lr_at_half() == pytest.approx(0.5)  # one cosine cycle: half-way down
    assert lr_at_half(lr_scheduler_kwargs=kwargs) == pytest.approx(1.0)  # two cycles: restarted at the peak


def test_lr_scheduler_kwargs_must_be_a_mapping():
    with pytest.raises(TunepipeError, match="lr_scheduler_kwargs"):
        load_config(None, ["train.lr_scheduler_kwargs=[1, 2]"])
    with pytest.raises(TunepipeError, match="must be a mapping or its JSON text"):
        load_config(None, ["train.lr_scheduler_kwargs=cycles"]).train.scheduler_kwargs()


def loss_rows(layout: Layout) -> list[dict]:
    with open(layout.plots / "train_loss.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_neftune_noises_the_embeddings_in_training_only(tmp_path, tiny_model_dir):
    losses = {}
    for name, alpha in (("plain", None), ("neftune", 50.0)):
        cfg, layout = tiny_run(tmp_path / name, tiny_model_dir, max_steps=1, neftune_noise_alpha=alpha)
        run_train(cfg, layout)
        losses[name] = float(loss_rows(layout)[0]["loss"])
    assert losses["plain"] != losses["neftune"]  # the same first step, on noised embeddings
    # after training the hook is gone: the saved adapter evaluates deterministically, without noise
    from peft import PeftModel

    from tunepipe.models.base import load_causal_lm

    model = PeftModel.from_pretrained(load_causal_lm(layout.base_model), str(layout.adapter)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not model.get_input_embeddings()._forward_hooks
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_early_stopping_stops_when_the_eval_loss_stops_improving(tmp_path, tiny_model_dir):
    # a learning rate so small that LoRA's B stays ~1e-30: the eval loss is exactly the same each time
    cfg, layout = tiny_run(tmp_path, tiny_model_dir, eval_rows=4, max_steps=20, learning_rate=1e-30,
                           eval_strategy="steps", eval_steps=1, early_stopping_steps=2)
    summary = run_train(cfg, layout)
    assert summary["steps"] == 3  # best at the first evaluation, then 2 without improvement


def test_load_best_model_at_end_keeps_the_best_evaluated_checkpoint(tmp_path, tiny_model_dir):
    # a learning rate high enough that the eval loss goes up again before the last step
    cfg, layout = tiny_run(tmp_path, tiny_model_dir, eval_rows=4, max_steps=6, learning_rate=0.3,
                           eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True)
    run_train(cfg, layout)
    state = json.loads((layout.checkpoints / "checkpoint-6" / "trainer_state.json").read_text())
    evals = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    best = min(evals, key=evals.get)
    assert best != 6, evals  # the run is set up so that the last step is not the best one
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}")
    kept = load_file(layout.adapter / "adapter_model.safetensors")
    at_best = load_file(layout.checkpoints / f"checkpoint-{best}" / "adapter_model.safetensors")
    last = load_file(layout.checkpoints / "checkpoint-6" / "adapter_model.safetensors")
    assert kept.keys() == at_best.keys()
    for name in kept:
        torch.testing.assert_close(kept[name], at_best[name], rtol=0, atol=0)
    assert any(not torch.equal(kept[name], last[name]) for name in kept)


def test_best_and_early_stopping_need_evaluations():
    with pytest.raises(TunepipeError, match="set eval_strategy: steps"):
        load_config(None, ["train.early_stopping_steps=2"])
    with pytest.raises(TunepipeError, match="multiple of eval_steps"):
        load_config(None, ["train.load_best_model_at_end=true", "train.eval_strategy=steps",
                           "train.eval_steps=3", "train.save_steps=4"])


def test_logging_first_step_and_dataloader_drop_last(tmp_path, tiny_model_dir):
    cfg, layout = tiny_run(tmp_path / "first", tiny_model_dir, max_steps=4, logging_steps=3, logging_first_step=True)
    run_train(cfg, layout)
    assert [int(row["step"]) for row in loss_rows(layout)] == [1, 3]
    steps = {}
    for drop in (False, True):  # 5 rows in micro-batches of 2: 3 steps an epoch, or 2 with the last dropped
        cfg, layout = tiny_run(tmp_path / str(drop), tiny_model_dir, rows=5, max_steps=-1, num_train_epochs=1,
                               dataloader_drop_last=drop)
        steps[drop] = run_train(cfg, layout)["steps"]
    assert steps == {False: 3, True: 2}


def test_full_determinism_and_eval_accumulation_reach_the_trainer(tmp_path):
    try:
        trainer = built_trainer(tmp_path, full_determinism=True, eval_accumulation_steps=3)
        assert torch.are_deterministic_algorithms_enabled()  # the Trainer switched them on
    finally:
        torch.use_deterministic_algorithms(False)
    assert trainer.args.eval_accumulation_steps == 3


def test_checkpointing_keys_reach_torch_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """LLaMA-Factory's `disable_gradient_checkpointing: false` turns checkpointing on with
    `use_reentrant_gc`; `gradient_checkpointing_kwargs` win over it: the kwargs torch's checkpoint
    receives, spied where transformers calls it. The loss is the same either way."""
    from transformers import modeling_utils

    real, seen = modeling_utils.checkpoint, []

    def spy(function, *args, **kwargs):
        seen.append(kwargs.get("use_reentrant"))
        return real(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", spy)
    runs = {"lf_switch": {"disable_gradient_checkpointing": False, "use_reentrant_gc": True},
            "kwargs_win": {"gradient_checkpointing": True, "use_reentrant_gc": True,
                           "gradient_checkpointing_kwargs": {"use_reentrant": False}}}
    used, losses = {}, {}
    for name, keys in runs.items():
        seen.clear()
        cfg, layout = tiny_run(tmp_path / name, tiny_model_dir, max_steps=1, **keys)
        run_train(cfg, layout)
        used[name], losses[name] = set(seen), float(loss_rows(layout)[0]["loss"])
        assert len(seen) >= 2, name  # each of the 2 decoder layers, in every forward
    assert used == {"lf_switch": {True}, "kwargs_win": {False}}
    assert losses["lf_switch"] == pytest.approx(losses["kwargs_win"], rel=1e-5)
    off = training_arguments(Config(train=TrainConfig(disable_gradient_checkpointing=True)), Layout.at(tmp_path), False)
    assert off.activation_checkpointing is False and off.activation_checkpointing_kwargs is None
    with pytest.raises(TunepipeError, match="disable_gradient_checkpointing"):
        load_config(None, ["gradient_checkpointing=true", "disable_gradient_checkpointing=true"])


def test_llamafactory_mossvl_checkpointing_keys_load_as_written():
    from tests.test_llamafactory_examples_sweep import EXAMPLES

    path = EXAMPLES / "train_full" / "mossvl_full_sft.yaml"
    if not path.is_file():
        pytest.skip(f"LLaMA-Factory's examples not found at {EXAMPLES}")
    train = load_config(path).train
    assert train.checkpointing and train.checkpointing_kwargs() == {"use_reentrant": False}
