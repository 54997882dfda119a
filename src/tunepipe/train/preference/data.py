"""Batches for the preference objectives, built from the tokenized shards as they are.

Preference rows (`stage: dpo` / `rm`) hold `chosen_input_ids`, `chosen_labels`,
`rejected_input_ids`, `rejected_labels`; KTO rows hold `input_ids`, `labels`,
`kto_tag`. The prompt is the leading run of `-100` labels. Nothing is re-tokenized:
rows are only padded (to the longest row of the batch, never to cutoff_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunepipe.train.preference.losses import IGNORE_INDEX

PREFERENCE_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
KTO_COLUMNS = ("input_ids", "labels", "kto_tag")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
KTO_REF_COLUMNS = ("ref_logps", "ref_kl_logps")


def pad_rows(input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict:
    """Right-pad rows to the longest one: input ids, labels (-100) and the attention mask."""
    width = max(len(row) for row in input_ids)
    ids = torch.full((len(input_ids), width), pad_token_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(zip(input_ids, labels)):
        ids[i, :len(row_ids)] = torch.as_tensor(row_ids, dtype=torch.long)
        lab[i, :len(row_labels)] = torch.as_tensor(row_labels, dtype=torch.long)
        mask[i, :len(row_ids)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


@dataclass
class PreferenceCollator:
    """One forward for both answers: rows 0..B-1 are the chosen answers, B..2B-1 the rejected.

    `media` (a vision-language model's `data.vision.MediaTokens`): the rows' images go in twice,
    once for the chosen rows and once for the rejected rows, so both answers see the prompt's
    images exactly as a lone forward of that row would."""

    pad_token_id: int
    media: object | None = None

    def __call__(self, rows: list[dict]) -> dict:
        batch = pad_rows([r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows],
                         [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows],
                         self.pad_token_id)
        if self.media is not None:
            media = [r.get("media") for r in rows]
            batch.update(self.media.batch_inputs(batch["input_ids"], media + media))
        if REF_COLUMNS[0] in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows]
                                              + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
        return batch


@dataclass
class KtoCollator:
    """Rows 0..B-1 are the tagged completions, B..2B-1 their mismatched KL pairs (`kl_*` columns)."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        batch = pad_rows([r["input_ids"] for r in rows] + [r["kl_input_ids"] for r in rows],
                         [r["labels"] for r in rows] + [r["kl_labels"] for r in rows], self.pad_token_id)
        batch["kto_tag"] = torch.tensor([bool(r["kto_tag"]) for r in rows])
        if KTO_REF_COLUMNS[0] in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows]
                                              + [r["ref_kl_logps"] for r in rows], dtype=torch.float32)
        return batch


def prompt_length(labels: list[int]) -> int:
    """Length of the leading run of -100 labels: the prompt, by the tokenizer's contract."""
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return i
    return len(labels)


def add_kto_kl_pairs(dataset, max_length: int | None = None):
    """Add `kl_input_ids` / `kl_labels`: row i's prompt followed by row i-1's completion.

    KTO estimates its reference point from mismatched (prompt, completion) pairs; like the
    paper, the completion comes from another example, here the previous row (cyclically),
    so each pair is fixed by the data and the same in every epoch and on every resume.
    Only token lists are spliced, nothing is re-tokenized. A pair longer than
    `max_length` keeps its head, as the tokenizer's truncation does.
    """
    if len(dataset) < 2:
        from tunepipe.errors import TunepipeError

        raise TunepipeError(f"stage kto needs at least 2 training rows to form mismatched KL pairs "
                            f"(got {len(dataset)})")
    input_ids, labels = dataset["input_ids"], dataset["labels"]
    kl_ids, kl_labels = [], []
    for i in range(len(dataset)):
        prompt = prompt_length(labels[i])
        donor = i - 1  # -1 wraps to the last row
        start = prompt_length(labels[donor])
        ids = list(input_ids[i][:prompt]) + list(input_ids[donor][start:])
        lab = [IGNORE_INDEX] * prompt + list(labels[donor][start:])
        if max_length is not None:
            ids, lab = ids[:max_length], lab[:max_length]
        kl_ids.append(ids)
        kl_labels.append(lab)
    return dataset.add_column("kl_input_ids", kl_ids).add_column("kl_labels", kl_labels)
