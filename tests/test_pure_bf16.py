"""`pure_bf16: true` (LLaMA-Factory's key): frozen weights stored in bfloat16, trained ones in
float32, bf16 autocast; the loss stays finite and close to float32 training.

Difference from LLaMA-Factory, on purpose: LLaMA-Factory's pure_bf16 also keeps the trained
weights in bf16; tunepipe keeps them float32 (AdamW updates are below bf16's resolution for
most weights), so only the frozen weights, the bulk of the memory, shrink.
"""

from __future__ import annotations

import csv

import pytest
import torch

from tests.fixtures.train_runs import tiny_run
from tunepipe.config import Config, ModelConfig, TrainConfig
from tunepipe.layout import Layout
from tunepipe.models.base import prepare_base_model
from tunepipe.train import run_train
from tunepipe.train.model.adapters import skip_input_casts_under_autocast
from tunepipe.train.model.model_setup import build_trainable_model


@pytest.fixture(scope="module")
def layout(tiny_model_dir, tmp_path_factory) -> Layout:
    layout = Layout.at(tmp_path_factory.mktemp("pure-bf16"))
    prepare_base_model(ModelConfig(model_name_or_path=str(tiny_model_dir)), layout.base_model)
    return layout


def dtypes(model, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize("finetuning_type", ["lora", "freeze"])
def test_frozen_weights_are_bf16_and_trained_ones_float32(layout, finetuning_type):
    cfg = Config(model=ModelConfig(model_name_or_path="unused"),
                 train=TrainConfig(finetuning_type=finetuning_type, pure_bf16=True, freeze_trainable_layers=1,
                                   additional_target="embed_tokens" if finetuning_type == "lora" else None))
    model = build_trainable_model(cfg, layout)
    if finetuning_type == "lora":  # modules_to_save (a trained copy of the embeddings) too
        assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    assert dtypes(model, trainable=False) == {torch.bfloat16}
    assert dtypes(model, trainable=True) == {torch.float32}
    plain = build_trainable_model(Config(model=cfg.model, train=TrainConfig(finetuning_type=finetuning_type,
                                                                          freeze_trainable_layers=1)), layout)
    assert dtypes(plain, trainable=False) == {torch.float32}  # the tiny base is stored in float32


def test_full_fine_tuning_trains_float32_weights(layout):
    cfg = Config(model=ModelConfig(model_name_or_path="unused"),
                 train=TrainConfig(finetuning_type="full", pure_bf16=True))
    model = build_trainable_model(cfg, layout)
    assert dtypes(model, trainable=True) == {torch.float32} and not dtypes(model, trainable=False)


def test_pure_bf16_trains_close_to_float32(tmp_path, tiny_model_dir):
    curves = {}
    for name, knobs in {"fp32": {}, "pure_bf16": {"pure_bf16": True}}.items():
        cfg, layout = tiny_run(tmp_path / name, tiny_model_dir, rows=4, max_steps=3,
                               per_device_train_batch_size=4, **knobs)
        summary = run_train(cfg, layout)
        with open(layout.plots / "train_loss.csv", newline="") as handle:
            curves[name] = [float(row["loss"]) for row in csv.DictReader(handle)]
        assert summary["steps"] == 3
    assert all(torch.isfinite(torch.tensor(curves["pure_bf16"])))
    assert curves["pure_bf16"] == pytest.approx(curves["fp32"], rel=2e-2)
    assert curves["pure_bf16"] != curves["fp32"]  # bf16 really ran


def test_lora_inputs_are_not_round_tripped_through_float32_under_autocast(layout):
    """PEFT casts a LoRA input to the adapter's float32 and autocast casts it straight back;
    tunepipe skips that round trip under autocast: the same logits, one cast per LoRA layer fewer."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountUpcasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ == "_to_copy" and args[0].dtype == torch.bfloat16 \
                    and out.dtype == torch.float32:
                self.count += 1
            return out

    # PEFT's forward: one cast per LoRA layer (fused_lora casts once per group sharing an input)
    cfg = Config(model=ModelConfig(model_name_or_path="unused"), train=TrainConfig(pure_bf16=True, fused_lora=False))
    model = build_trainable_model(cfg, layout)
    lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 64]])

    def run():
        counter = CountUpcasts()
        with torch.no_grad(), counter, torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        return logits, counter.count

    skipped_logits, skipped = run()
    for layer in lora_layers:
        layer.cast_input_dtype_enabled = True  # PEFT's default
    cast_logits, casts = run()
    assert len(lora_layers) == 14 and casts - skipped == len(lora_layers)
    assert torch.equal(skipped_logits, cast_logits)
    skip_input_casts_under_autocast(model)
    with torch.no_grad():  # outside autocast the cast is still made: bf16 inputs meet float32 adapters
        assert model(input_ids=ids).logits.isfinite().all()
