"""Teacher-forced metrics on tokenized rows: loss, perplexity, token accuracy, sequence log-probs.

Written by hand instead of through `Trainer.evaluate` because we need two numbers the
Trainer does not give (token accuracy and per-sequence log-probs for preference pairs)
and because the Trainer averages per-batch means, which weights a short batch like a
long one. Here every figure is token-weighted over the whole split: `eval_loss` is the
mean negative log-likelihood of every label token, `perplexity = exp(eval_loss)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

IGNORE_INDEX = -100


def padded(rows: Sequence[Sequence[int]], value: int, left: bool = False):
    """Rows as one LongTensor padded to the longest, plus the attention mask."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def batched(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(start + size, count))


def model_device(model):
    return next(model.parameters()).device


def _shifted_logits(model, input_rows, label_rows, pad_id: int, extra: dict | None = None):
    """Logits at each position with the label they predict (the next token), -100 where none.
    `extra`: more forward inputs for these rows (a vision-language model's images)."""
    ids, mask = padded(input_rows, pad_id)
    labels, _ = padded(label_rows, IGNORE_INDEX)
    device = model_device(model)
    extra = {key: value.to(device) for key, value in (extra or {}).items()}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits.float()
    return logits[:, :-1], labels[:, 1:].to(device)


def token_metrics(model, input_rows, label_rows, pad_id: int, batch_size: int = 1,
                  desc: str = "eval loss", extra_inputs=None) -> dict[str, float]:
    """eval_loss, perplexity and token_accuracy over every label token of the rows
    (`extra_inputs(indices)`: more forward inputs for those rows, e.g. their images)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    nll_sum, correct, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for index in tqdm(list(batched(len(input_rows), batch_size)), desc=desc, unit="batch"):
            logits, labels = _shifted_logits(model, [input_rows[i] for i in index],
                                             [label_rows[i] for i in index], pad_id,
                                             extra_inputs(list(index)) if extra_inputs else None)
            valid = labels != IGNORE_INDEX
            nll_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum").item()
            correct += ((logits.argmax(-1) == labels) & valid).sum().item()
            tokens += valid.sum().item()
    if tokens == 0:
        return {}
    loss = nll_sum / tokens
    return {"eval_loss": loss, "perplexity": _safe_exp(loss), "token_accuracy": correct / tokens,
            "eval_tokens": tokens}


def _safe_exp(value: float) -> float:
    # JSON (and so DVC metrics) has no infinity; a loss this large means "no better than noise".
    return math.exp(min(value, 700.0))


def sequence_logps(model, input_rows, label_rows, pad_id: int, batch_size: int = 1,
                   desc: str = "log-probs", extra_inputs=None) -> list[tuple[float, int]]:
    """Per row: (sum of the label tokens' log-probs, number of label tokens); `extra_inputs` as
    in `token_metrics`."""
    import torch
    from tqdm.auto import tqdm

    out: list[tuple[float, int]] = []
    with torch.inference_mode():
        for index in tqdm(list(batched(len(input_rows), batch_size)), desc=desc, unit="batch"):
            logits, labels = _shifted_logits(model, [input_rows[i] for i in index],
                                             [label_rows[i] for i in index], pad_id,
                                             extra_inputs(list(index)) if extra_inputs else None)
            valid = labels != IGNORE_INDEX
            gathered = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums = (gathered * valid).sum(-1)
            out.extend(zip(sums.tolist(), valid.sum(-1).tolist()))
    return out
