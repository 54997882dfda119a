"""The label-only chunked loss equals transformers' own causal-LM loss, value and gradients."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.sft_shards import collated_sft_batch, trainable_model
from tunepipe.train import loss as loss_module
from tunepipe.train.loss import causal_lm_loss, linear_cross_entropy


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    return collated_sft_batch(tiny_model_dir)


def fresh_model(tiny_model_dir):
    return trainable_model(tiny_model_dir)


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_equal_transformers(tiny_model_dir, batch, monkeypatch):
    monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab: 7)  # several chunks
    reference = fresh_model(tiny_model_dir)
    expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    expected.backward()
    ours = fresh_model(tiny_model_dir)
    got = causal_lm_loss(ours, batch)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    want, have = grads(reference), grads(ours)
    assert want.keys() == have.keys()
    assert "model.embed_tokens.weight" in want  # the tied output head's gradient lands here
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_normaliser_is_the_step_token_count(tiny_model_dir, batch):
    model = fresh_model(tiny_model_dir)
    count = int((batch["shift_labels"] != -100).sum())
    per_token = causal_lm_loss(model, batch)
    over_step = causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(3 * count))
    assert over_step.item() == pytest.approx(per_token.item() / 3, rel=1e-6)


def test_linear_cross_entropy_matches_autograd_with_bias_and_scaled_output():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    bias = torch.randn(30, requires_grad=True)
    targets = torch.randint(0, 30, (50,))
    (2.5 * linear_cross_entropy(hidden, weight, bias, targets, 40)).backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = hidden @ weight.T + bias
    (2.5 * torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / 40).backward()
    for got, want in zip(ours, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_float32(tiny_model_dir, batch):
    model = fresh_model(tiny_model_dir)
    exact = causal_lm_loss(model, batch).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = causal_lm_loss(model, batch)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(exact, rel=2e-2)


def test_no_grad_evaluation_returns_the_same_value(tiny_model_dir, batch):
    model = fresh_model(tiny_model_dir)
    with_grad = causal_lm_loss(model, batch).item()
    with torch.no_grad():
        assert causal_lm_loss(model, batch).item() == pytest.approx(with_grad, rel=1e-6)
