"""Batches: padding only to the longest row, packed rows isolated per sample, padding-free flattening."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.sft_shards import pack, sft_rows
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.train.batches.collate import SegmentCollator, model_inputs, shifted_labels, varlen_kwargs
from tunepipe.train.batches.varlen_attention import NAME as VARLEN
from tunepipe.train.batches.varlen_attention import register
from tunepipe.train.loss import causal_lm_loss


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def model_with(tiny_model_dir, attn: str):
    if attn == VARLEN:
        register()
    model = load_causal_lm(tiny_model_dir, attn_implementation=attn)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def per_token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every trained position, in reading order."""
    logits = model(**model_inputs(batch)).logits
    targets = batch["shift_labels"]
    chosen = targets != -100
    return torch.nn.functional.cross_entropy(logits[chosen].float(), targets[chosen], reduction="none")


def test_padding_reaches_only_the_longest_row(tokenizer):
    rows = sft_rows(tokenizer, 3)
    batch = SegmentCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["attention_mask"].sum().item() == sum(len(r["input_ids"]) for r in rows)
    padded = SegmentCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)(rows)
    assert padded["input_ids"].shape[1] == -(-longest // 8) * 8


def test_shifted_labels_never_cross_a_sample_boundary():
    assert shifted_labels([-100, 5, 6, 7, 8, 9], [3, 3]) == [5, 6, -100, 8, 9, -100]


def test_packed_row_positions_and_no_mask(tokenizer):
    """Isolation comes from restarting position ids (transformers' packed-sample detection
    builds each layer type's mask from them): no mask reaches the model on SDPA / eager."""
    from transformers.masking_utils import find_packed_sequence_indices

    rows = pack(sft_rows(tokenizer, 3), cutoff=10_000)
    batch = SegmentCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    lens = rows[0]["seq_lens"]
    assert batch["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    samples = find_packed_sequence_indices(batch["position_ids"])[0].tolist()
    assert samples == [i for i, n in enumerate(lens) for _ in range(n)]


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
def test_packed_equals_unpacked_per_token_loss_and_gradients(tiny_model_dir, tokenizer, attn):
    rows = sft_rows(tokenizer, 5)
    packed_rows = pack(rows, cutoff=3 * max(len(r["input_ids"]) for r in rows))
    assert len(packed_rows) < len(rows) and any(len(r["seq_lens"]) > 1 for r in packed_rows)
    collate = SegmentCollator(pad_token_id=tokenizer.pad_token_id, attn_implementation=attn)
    unpacked, packed = collate(rows), collate(packed_rows)

    plain, pk = model_with(tiny_model_dir, attn), model_with(tiny_model_dir, attn)
    torch.testing.assert_close(per_token_losses(pk, packed), per_token_losses(plain, unpacked),
                               rtol=1e-5, atol=1e-5)
    causal_lm_loss(plain, unpacked).backward()
    causal_lm_loss(pk, packed).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), pk.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_flattened_batch_equals_padded_batch(tiny_model_dir, tokenizer, attn):
    rows = sft_rows(tokenizer, 4)
    padded = SegmentCollator(pad_token_id=tokenizer.pad_token_id, attn_implementation=attn)(rows)
    flat = SegmentCollator(pad_token_id=tokenizer.pad_token_id, attn_implementation=attn, flatten=True)(rows)
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    model = model_with(tiny_model_dir, attn)
    torch.testing.assert_close(per_token_losses(model, flat), per_token_losses(model, padded),
                               rtol=1e-5, atol=1e-5)


def test_a_sample_cannot_see_its_neighbour(tiny_model_dir, tokenizer):
    rows = sft_rows(tokenizer, 2)
    changed = [dict(rows[0], input_ids=[7] * len(rows[0]["input_ids"])), rows[1]]
    collate = SegmentCollator(pad_token_id=tokenizer.pad_token_id, flatten=True)
    model = model_with(tiny_model_dir, "sdpa")
    start = len(rows[0]["input_ids"])
    with torch.no_grad():
        a = model(**model_inputs(collate(rows))).logits[0, start:]
        b = model(**model_inputs(collate(changed))).logits[0, start:]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_flash_attention_gets_varlen_boundaries(tokenizer):
    rows = pack(sft_rows(tokenizer, 3), cutoff=10_000)
    batch = SegmentCollator(pad_token_id=tokenizer.pad_token_id,
                            attn_implementation="flash_attention_2")(rows)
    lens = rows[0]["seq_lens"]
    assert batch["cu_seq_lens_q"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert batch["max_length_q"] == max(lens) and "segment_mask" not in batch
    assert set(model_inputs(batch)) >= {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    # rows of unequal width: padding tails count as segments of their own
    assert varlen_kwargs([[3, 2], [4]], 5)["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10]


@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_isolation_check_catches_a_model_that_ignores_packed_positions(tiny_model_dir, tokenizer, attn,
                                                                       monkeypatch):
    """A model whose code builds no per-sample masks (as remote code may) is refused before training,
    unless its kernel isolates samples by itself (per-sample SDPA from cu_seq_lens)."""
    from transformers import masking_utils

    from tunepipe.errors import TunepipeError
    from tunepipe.train.batches import isolation

    model = model_with(tiny_model_dir, attn)
    collate = SegmentCollator(pad_token_id=tokenizer.pad_token_id, attn_implementation=attn, flatten=True)
    monkeypatch.setattr(isolation, "built_into_transformers", lambda model: False)
    isolation.check_sample_isolation(model, collate)  # transformers' own Llama code: isolated
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    if attn == VARLEN:
        isolation.check_sample_isolation(model, collate)
    else:
        with pytest.raises(TunepipeError, match="lets a sample of a padding-free batch see"):
            isolation.check_sample_isolation(model, collate)
