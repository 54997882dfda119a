"""What an evaluation leaves behind: `metrics/eval.json`, `reports/predictions.jsonl`, and the
figures logged into the train stage's MLflow run. Shared by the LM evaluation (`run.py`) and the
reward-model evaluation (`reward.py`).
"""

from __future__ import annotations

import json

from tunepipe.config import Config
from tunepipe.io_utils import write_json_atomic, write_text_atomic
from tunepipe.layout import Layout
from tunepipe.tracking.tracker import join_train_run

EVAL_METRICS = "eval.json"
PREDICTIONS = "predictions.jsonl"


def write_outputs(layout: Layout, report: dict, rows: list[dict]) -> None:
    """Both files are replaced atomically; predictions is written even when empty (a DVC out)."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_text_atomic(layout.reports / PREDICTIONS, lines)
    write_json_atomic(layout.metrics / EVAL_METRICS, report)


def flat_metrics(report: dict, prefix: str = "eval") -> dict[str, float]:
    """`{"tuned": {"rouge-1": x}}` -> `{"eval/tuned/rouge-1": x}` for MLflow."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)):
            flat[f"{prefix}/{key}"] = value
    return flat


def log_report(cfg: Config, source, report: dict) -> None:
    tracker = join_train_run(cfg, source.record_dir)
    if tracker is not None:
        tracker.log_metrics(flat_metrics(report))
