"""The Trainer knobs that reach the loss, the sampler, compilation and precision: label smoothing
equals transformers' LabelSmoother (value and gradients) on a fixed batch, group_by_length orders a
step's rows by length, tf32 reaches TrainingArguments (only where a GPU has it) and torch_compile does
not (the decoder layers are compiled instead: tests/test_fast_path.py).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.fixtures.sft_shards import collated_sft_batch, trainable_model
from tests.fixtures.train_runs import tiny_run
from tunepipe.config import Config, TrainConfig
from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import load_causal_lm
from tunepipe.train import loss as loss_module
from tunepipe.train import run_train
from tunepipe.train.loss import causal_lm_loss, linear_cross_entropy
from tunepipe.train.trainer_setup import training_arguments


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    return collated_sft_batch(tiny_model_dir)


def fresh_model(tiny_model_dir):
    return trainable_model(tiny_model_dir)


def test_label_smoothing_equals_transformers_label_smoother(tiny_model_dir, batch, monkeypatch):
    from transformers.trainer_pt_utils import LabelSmoother

    monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab: 7)  # several chunks
    reference = fresh_model(tiny_model_dir)
    outputs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = LabelSmoother(epsilon=0.1)(outputs, batch["labels"], shift_labels=True)
    expected.backward()
    ours = fresh_model(tiny_model_dir)
    got = causal_lm_loss(ours, batch, label_smoothing=0.1)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() != causal_lm_loss(ours, batch).item()  # smoothing changed it
    for name, param in reference.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(dict(ours.named_parameters())[name].grad, param.grad,
                                       rtol=1e-4, atol=1e-6, msg=name)


def test_label_smoothing_gradients_of_the_chunked_projection():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    bias = torch.randn(30, requires_grad=True)
    targets = torch.randint(0, 30, (50,))
    linear_cross_entropy(hidden, weight, bias, targets, 40, label_smoothing=0.2).backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = hidden @ weight.T + bias
    (torch.nn.functional.cross_entropy(logits, targets, reduction="sum", label_smoothing=0.2) / 40).backward()
    for got, want in zip(ours, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_label_smoothing_reaches_the_training_loss(tmp_path, tiny_model_dir):
    import csv

    first = {}
    for eps in (0.0, 0.3):
        cfg, layout = tiny_run(tmp_path / str(eps), tiny_model_dir, max_steps=1, label_smoothing_factor=eps)
        run_train(cfg, layout)
        with open(layout.plots / "train_loss.csv", newline="") as handle:
            first[eps] = float(next(csv.DictReader(handle))["loss"])
    assert first[0.3] != first[0.0]  # the same first step, scored against smoothed targets


def test_group_by_length_orders_a_step_by_length(tmp_path, tiny_model_dir):
    from datasets import Dataset
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [3, 9, 5, 12, 7, 4, 10, 6]
    rows = Dataset.from_dict({"input_ids": [list(range(n)) for n in lengths],
                              "labels": [list(range(n)) for n in lengths]})

    def order(group: bool) -> list[int]:
        cfg = Config(train=TrainConfig(group_by_length=group, per_device_train_batch_size=2,
                                       gradient_accumulation_steps=2))
        args = training_arguments(cfg, Layout.at(tmp_path), has_eval=False)
        trainer = Trainer(model=load_causal_lm(tiny_model_dir), args=args, train_dataset=rows)
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, LengthGroupedSampler) == group
        return [lengths[i] for i in sampler]

    grouped = order(True)
    # transformers' grouping: the rows of each optimizer step (2 x 2 here; a "mega-batch" on so few
    # rows) sorted longest first, and the longest row of all in the very first step
    assert grouped[0] == max(lengths) and sorted(grouped) == sorted(lengths)
    for start in range(0, len(grouped), 4):
        step = grouped[start + 1:start + 4]  # the first place may hold the row swapped in
        assert step == sorted(step, reverse=True), grouped
    assert sorted(order(False)) == sorted(lengths)


def test_tf32_reaches_the_training_arguments_and_torch_compile_stays_regional(tmp_path, caplog, monkeypatch):
    from tunepipe.train import trainer_setup

    cfg = Config(train=TrainConfig(torch_compile=True, tf32=True))
    with caplog.at_level(logging.WARNING, logger="tunepipe.train.trainer_setup"):
        args = training_arguments(cfg, Layout.at(tmp_path), has_eval=False)
    assert args.torch_compile is False  # no whole-model compile by the Trainer: fast_path compiles each layer
    if not torch.cuda.is_available():
        assert args.tf32 is None and "TF32 needs an NVIDIA Ampere or newer GPU" in caplog.text
    # where the GPU has TF32, the value goes through (checked without building TrainingArguments)
    monkeypatch.setattr("transformers.utils.is_torch_tf32_available", lambda: True)
    assert trainer_setup.tf32_setting(cfg.train) is True
    assert trainer_setup.tf32_setting(TrainConfig(tf32=False)) is False


def test_loss_knobs_need_a_next_token_stage():
    with pytest.raises(TunepipeError, match="next-token stages"):
        load_config(None, ["train.stage=dpo", "train.label_smoothing_factor=0.1"])
    with pytest.raises(TunepipeError, match="must be in"):
        load_config(None, ["train.label_smoothing_factor=1.5"])
