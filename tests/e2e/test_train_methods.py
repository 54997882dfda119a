"""Each fine-tuning method trains end to end through `run_train` on the tiny model.

What is checked: the loss goes down on a tiny memorisation set, trained parameters moved
and frozen ones did not, and the saved weights reload to the very logits the trained
model produced in memory.
"""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file
from tests.fixtures.train_runs import tiny_run

from tunepipe.models.base import load_causal_lm
from tunepipe.train import run_train, session

PROBE = torch.tensor([[1, 40, 52, 77, 90, 2, 61, 33]])


@pytest.fixture
def captured(monkeypatch):
    """The in-memory model's logits on PROBE when outputs are written."""
    seen = {}
    real = session.write_outputs

    def spy(cfg, layout, model, *args, **kwargs):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=PROBE).logits.float()
        return real(cfg, layout, model, *args, **kwargs)

    monkeypatch.setattr(session, "write_outputs", spy)
    return seen


def losses(layout) -> list[float]:
    with open(layout.plots / "train_loss.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def assert_memorises(layout):
    curve = losses(layout)
    assert len(curve) == 8
    assert curve[-1] < curve[0] - 0.4, curve


def probe_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


@pytest.mark.parametrize("quantization_bit", [None, 4])
def test_lora_and_qlora(tmp_path, tiny_model_dir, captured, quantization_bit):
    from peft import PeftModel

    from tunepipe.train.model.model_setup import load_base_for_training

    cfg, layout = tiny_run(tmp_path, tiny_model_dir, rows=4, max_steps=8, per_device_train_batch_size=4,
                           learning_rate=1e-2, model={"quantization_bit": quantization_bit})
    summary = run_train(cfg, layout)
    assert summary["steps"] == 8 and summary["tokens_seen"] > 0
    assert_memorises(layout)
    assert (layout.full / "NOT_USED.md").is_file() and not (layout.full / "config.json").exists()
    adapter = load_file(layout.adapter / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapter) and all("lora_" in k for k in adapter)
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at zero
    base = load_base_for_training(cfg, layout)  # quantized again for QLoRA
    reloaded = PeftModel.from_pretrained(base, str(layout.adapter))
    torch.testing.assert_close(probe_logits(reloaded), captured["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("finetuning_type", ["freeze", "full"])
def test_freeze_and_full(tmp_path, tiny_model_dir, captured, finetuning_type):
    cfg, layout = tiny_run(tmp_path, tiny_model_dir, rows=4, max_steps=8, per_device_train_batch_size=4,
                           finetuning_type=finetuning_type, freeze_trainable_layers=1,
                           learning_rate=1e-2 if finetuning_type == "freeze" else 3e-3)
    run_train(cfg, layout)
    assert_memorises(layout)
    assert (layout.adapter / "NOT_USED.md").is_file()
    before = dict(load_causal_lm(tiny_model_dir).named_parameters())
    trained = load_causal_lm(layout.full)
    after = dict(trained.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    if finetuning_type == "freeze":
        assert changed and all(name.startswith("model.layers.1.") for name in changed)
        assert not any(name.startswith("model.layers.1.") for name in set(before) - changed)
    else:
        assert changed == set(before)
    torch.testing.assert_close(probe_logits(trained), captured["logits"], rtol=1e-5, atol=1e-5)


def test_continued_pretraining_on_packed_rows(tmp_path, tiny_model_dir):
    cfg, layout = tiny_run(tmp_path, tiny_model_dir, rows=12, packing=True, max_steps=8, stage="pt",
                           per_device_train_batch_size=1)
    summary = run_train(cfg, layout)
    assert_memorises(layout)
    from datasets import load_from_disk

    (row,) = load_from_disk(str(layout.tokenized / "train"))  # 12 samples packed into one row
    assert len(row["seq_lens"]) == 12
    assert summary["tokens_seen"] == 8 * len(row["input_ids"])  # padding-free: every token is real


def test_checkpointing_and_bf16_autocast_keep_the_loss_curve(tmp_path, tiny_model_dir):
    curves = {}
    for name, knobs in {"plain": {}, "checkpointing": {"gradient_checkpointing": True},
                        "bf16": {"bf16": True}}.items():
        cfg, layout = tiny_run(tmp_path / name, tiny_model_dir, rows=4, max_steps=3,
                               per_device_train_batch_size=4, **knobs)
        run_train(cfg, layout)
        curves[name] = losses(layout)
    assert curves["checkpointing"] == pytest.approx(curves["plain"], rel=1e-5)  # memory, not results
    assert curves["bf16"] == pytest.approx(curves["plain"], rel=2e-2)  # CPU autocast really trains
