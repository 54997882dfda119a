"""Which validated rows are tokenized, in which order: per-dataset sampling, mixing, eval split.

LLaMA-Factory's order of operations: `num_samples` (dataset_info.json, seeded sampling,
repeating rows when it asks for more than there are), then `max_samples` (the first N),
then the datasets are concatenated or interleaved, then `val_size` is split off. The
interleaving and the split use HF datasets' own functions on row indices, so the result
is seeded and identical on every run.
"""

from __future__ import annotations

import numpy as np

from tunepipe.config import DataConfig
from tunepipe.errors import TunepipeError

STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}


def sample_rows(rows: list[dict], num_samples: int | None, max_samples: int | None, seed: int) -> list[dict]:
    if num_samples is not None:
        rng = np.random.default_rng(seed)
        repeats, rest = divmod(num_samples, len(rows))
        order = list(range(len(rows))) * repeats + sorted(rng.permutation(len(rows))[:rest].tolist())
        rows = [rows[i] for i in order]
    if max_samples is not None:
        rows = rows[:max_samples]
    return rows


def mix(datasets: list[list[dict]], data: DataConfig) -> list[dict]:
    """Several datasets -> one list of rows by data.mix_strategy."""
    if len(datasets) == 1 or data.mix_strategy == "concat":
        return [row for rows in datasets for row in rows]
    from datasets import Dataset, interleave_datasets

    probs = parse_probs(data.interleave_probs, len(datasets))
    parts = [Dataset.from_dict({"d": [k] * len(rows), "i": list(range(len(rows)))})
             for k, rows in enumerate(datasets)]
    mixed = interleave_datasets(parts, probabilities=probs, seed=data.split_seed,
                                stopping_strategy=STOPPING[data.mix_strategy])
    return [datasets[d][i] for d, i in zip(mixed["d"], mixed["i"])]


def parse_probs(value, count: int) -> list[float] | None:
    if value is None:
        return None
    probs = [float(p) for p in (value.split(",") if isinstance(value, str) else value)]
    if len(probs) != count:
        raise TunepipeError(f"data.interleave_probs={value!r}: {len(probs)} probabilities for {count} datasets")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise TunepipeError(f"data.interleave_probs={value!r}: probabilities must be >= 0 and sum to 1")
    return probs


def split_eval(rows: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out val_size (a fraction, or a row count when >= 1) as the eval split, seeded."""
    if not val_size:
        return rows, []
    from datasets import Dataset

    size = int(val_size) if val_size >= 1 else val_size
    if isinstance(size, int) and size >= len(rows):
        raise TunepipeError(f"data.val_size={val_size}: the eval split would take all {len(rows)} rows")
    try:
        split = Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(test_size=size, seed=seed)
    except ValueError as exc:
        raise TunepipeError(f"data.val_size={val_size} with {len(rows)} rows: {exc}") from None
    return [rows[i] for i in split["train"]["i"]], [rows[i] for i in split["test"]["i"]]
