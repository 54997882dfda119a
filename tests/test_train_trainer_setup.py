"""TrainingArguments from train.*, and which checkpoint a run resumes from (precision: test_devices.py)."""

from __future__ import annotations

import dataclasses

import pytest

from tunepipe.config import Config, TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train.trainer_setup import resume_checkpoint, training_arguments


def cfg_with(**train) -> Config:
    return Config(train=TrainConfig(**train))


def test_llama_factory_knobs_map_onto_training_arguments(tmp_path):
    layout = Layout.at(tmp_path)
    args = training_arguments(cfg_with(per_device_train_batch_size=3, gradient_accumulation_steps=5,
                                       warmup_ratio=0.25, eval_strategy="steps", logging_steps=7,
                                       save_total_limit=2, lr_scheduler_type="linear"), layout, has_eval=True)
    assert args.output_dir == str(layout.checkpoints)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 5)
    assert args.get_warmup_steps(100) == 25
    assert args.eval_strategy == "steps" and args.eval_steps == 7  # eval_steps defaults to logging_steps
    assert args.save_total_limit == 2 and args.lr_scheduler_type == "linear"
    assert args.report_to == [] or args.report_to == "none"
    assert training_arguments(cfg_with(warmup_steps=9, warmup_ratio=0.5), layout, False).get_warmup_steps(100) == 9


def test_eval_strategy_without_an_eval_split_is_an_error(tmp_path):
    with pytest.raises(TunepipeError, match="eval_strategy"):
        training_arguments(cfg_with(eval_strategy="steps"), Layout.at(tmp_path), has_eval=False)


def fake_checkpoint(layout: Layout, step: int, complete: bool = True):
    path = layout.checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_resume_from_the_last_complete_checkpoint_of_the_same_run(tmp_path):
    layout, cfg = Layout.at(tmp_path), cfg_with(learning_rate=1e-3)
    assert resume_checkpoint(cfg, layout, "data-a") is None  # fresh: records the run key
    fake_checkpoint(layout, 3)
    half = fake_checkpoint(layout, 6, complete=False)  # killed while saving
    # logging / saving knobs do not change what is trained: still the same run
    same = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, logging_steps=99, save_steps=7))
    assert resume_checkpoint(same, layout, "data-a") == str(layout.checkpoints / "checkpoint-3")
    assert not half.exists()


@pytest.mark.parametrize("change", ["learning_rate", "data", "overwrite", "false"])
def test_checkpoints_of_another_run_are_not_resumed(tmp_path, change):
    layout, cfg = Layout.at(tmp_path), cfg_with(learning_rate=1e-3)
    resume_checkpoint(cfg, layout, "data-a")
    old = fake_checkpoint(layout, 3)
    data = "data-b" if change == "data" else "data-a"
    train = {"learning_rate": {"learning_rate": 2e-3}, "data": {}, "overwrite": {"overwrite_output_dir": True},
             "false": {"resume_from_checkpoint": False}}[change]
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    assert resume_checkpoint(other, layout, data) is None
    assert not old.exists()


def test_explicit_resume_path_must_be_a_checkpoint(tmp_path):
    layout = Layout.at(tmp_path)
    with pytest.raises(TunepipeError, match="not a checkpoint"):
        resume_checkpoint(cfg_with(resume_from_checkpoint=str(tmp_path)), layout, None)
    with pytest.raises(TunepipeError, match="no checkpoint of this run"):
        resume_checkpoint(cfg_with(resume_from_checkpoint=True), layout, None)


def test_bf16_arguments_build_on_a_cpu_only_machine(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = training_arguments(cfg_with(bf16=True), Layout.at(tmp_path), has_eval=False)
    assert args.bf16 and args.use_cpu
