"""TrainingArguments from train.* (precision: test_devices.py; resume: test_train_checkpoints.py)."""

from __future__ import annotations

import pytest

from tunepipe.config import Config, TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train.trainer_setup import training_arguments


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


def test_bf16_arguments_build_on_a_cpu_only_machine(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = training_arguments(cfg_with(bf16=True), Layout.at(tmp_path), has_eval=False)
    assert args.bf16 and args.use_cpu
