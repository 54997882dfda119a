"""Which validated rows are tokenized, in which order: per-dataset sampling, mixing, eval split.

LLaMA-Factory's order of operations: `num_samples` (dataset_info.json, seeded sampling,
repeating rows when it asks for more than there are), then `max_samples` (the first N),
then the datasets are concatenated or interleaved, then `val_size` is split off. All of
it works on row numbers, never on the rows: a plan is an (n, 2) int32 array of
(dataset number, row number) pairs, 8 bytes a row. The interleaving and the split use
HF datasets' own functions on those numbers, so the result is seeded and identical on
every run.
"""

from __future__ import annotations

import numpy as np

from tunepipe.config import DataConfig
from tunepipe.errors import TunepipeError

STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}


def sample_indices(count: int, num_samples: int | None, max_samples: int | None, seed: int) -> np.ndarray:
    """Row numbers of one dataset of `count` rows after num_samples, then max_samples."""
    order = np.arange(count, dtype=np.int64)
    if num_samples is not None:
        rng = np.random.default_rng(seed)
        repeats, rest = divmod(num_samples, count)
        order = np.concatenate([np.tile(order, repeats), np.sort(rng.permutation(count)[:rest])])
    if max_samples is not None:
        order = order[:max_samples]
    return order


def plan_dtype(parts: list[np.ndarray]):
    """int32 pairs (8 bytes a row) unless a dataset has 2**31 rows or more."""
    return np.int32 if all(len(p) == 0 or int(p.max()) < 2**31 - 1 for p in parts) else np.int64


def mix_plan(parts: list[np.ndarray], data: DataConfig) -> np.ndarray:
    """Each dataset's sampled row numbers -> one plan of (dataset, row) by data.mix_strategy."""
    if len(parts) == 1 or data.mix_strategy == "concat":
        plan = np.empty((sum(map(len, parts)), 2), dtype=plan_dtype(parts))
        start = 0
        for k, rows in enumerate(parts):
            plan[start:start + len(rows), 0] = k
            plan[start:start + len(rows), 1] = rows
            start += len(rows)
        return plan
    import pyarrow as pa
    from datasets import Dataset, interleave_datasets

    probs = parse_probs(data.interleave_probs, len(parts))
    tables = [Dataset(pa.table({"d": np.full(len(rows), k, dtype=np.int64), "i": np.arange(len(rows))}))
              for k, rows in enumerate(parts)]
    mixed = interleave_datasets(tables, probabilities=probs, seed=data.split_seed,
                                stopping_strategy=STOPPING[data.mix_strategy]).with_format("numpy")[:]
    which, position = mixed["d"], mixed["i"]
    rows = np.empty(len(which), dtype=np.int64)
    for k, part in enumerate(parts):
        chosen = which == k
        rows[chosen] = part[position[chosen]]
    return np.stack([which, rows], axis=1).astype(plan_dtype(parts))


def parse_probs(value, count: int) -> list[float] | None:
    if value is None:
        return None
    probs = [float(p) for p in (value.split(",") if isinstance(value, str) else value)]
    if len(probs) != count:
        raise TunepipeError(f"data.interleave_probs={value!r}: {len(probs)} probabilities for {count} datasets")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise TunepipeError(f"data.interleave_probs={value!r}: probabilities must be >= 0 and sum to 1")
    return probs


def split_positions(count: int, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out val_size (a fraction, or a row count when >= 1) of `count` rows, seeded:
    the (train, eval) positions, in HF's train_test_split order."""
    if not val_size:
        return np.arange(count, dtype=np.int64), np.arange(0, dtype=np.int64)
    import pyarrow as pa
    from datasets import Dataset

    size = int(val_size) if val_size >= 1 else val_size
    if isinstance(size, int) and size >= count:
        raise TunepipeError(f"data.val_size={val_size}: the eval split would take all {count} rows")
    try:
        split = Dataset(pa.table({"i": np.arange(count, dtype=np.int64)})).train_test_split(test_size=size, seed=seed)
    except ValueError as exc:
        raise TunepipeError(f"data.val_size={val_size} with {count} rows: {exc}") from None
    return split["train"].with_format("numpy")[:]["i"], split["test"].with_format("numpy")[:]["i"]


# -- the same on lists of rows (small data, tests) ------------------------------------


def sample_rows(rows: list[dict], num_samples: int | None, max_samples: int | None, seed: int) -> list[dict]:
    return [rows[i] for i in sample_indices(len(rows), num_samples, max_samples, seed)]


def mix(datasets: list[list[dict]], data: DataConfig) -> list[dict]:
    plan = mix_plan([np.arange(len(rows)) for rows in datasets], data)
    return [datasets[d][i] for d, i in plan.tolist()]


def split_eval(rows: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    train, held_out = split_positions(len(rows), val_size, seed)
    return [rows[i] for i in train.tolist()], [rows[i] for i in held_out.tolist()]
