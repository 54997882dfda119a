"""Gradient accumulation is normalised over the whole optimizer step, as one big batch is."""

from __future__ import annotations

import csv

import torch
from safetensors.torch import load_file
from tests.fixtures.train_runs import tiny_run

from tunepipe.train import run_train


def one_step(root, tiny_model_dir, batch: int, accumulation: int):
    # Plain SGD without clipping: the update is proportional to the gradient, so any
    # normalisation difference (per micro-batch vs per step) would show in the weights.
    cfg, layout = tiny_run(root, tiny_model_dir, rows=4, max_steps=1, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5,
                           max_grad_norm=0.0)
    run_train(cfg, layout)
    with open(layout.plots / "train_loss.csv", newline="") as handle:
        loss = float(next(csv.DictReader(handle))["loss"])
    return load_file(layout.adapter / "adapter_model.safetensors"), loss


def test_batch_4_equals_batch_1_times_accumulation_4(tmp_path, tiny_model_dir):
    big, big_loss = one_step(tmp_path / "big", tiny_model_dir, batch=4, accumulation=1)
    small, small_loss = one_step(tmp_path / "small", tiny_model_dir, batch=1, accumulation=4)
    assert small_loss == big_loss or abs(small_loss - big_loss) < 1e-5 * big_loss
    moved = [name for name, tensor in big.items() if "lora_B" in name and tensor.abs().sum() > 0]
    assert moved  # the step really changed the adapter
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-7, msg=name)
