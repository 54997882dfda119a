"""What the train stage leaves behind, each output written atomically.

For the preference trainers: call `write_outputs(cfg, layout, model, tokenizer, summary,
log_history, tracker)` once training ended; it writes
- `models/adapter/` (PEFT format) for lora, or `models/full/` (HF dir) for freeze / full,
  with the tokenizer, `tunepipe_run.json` and, with `plot_loss`, `training_loss.png`;
  the other of the two dirs holds only `NOT_USED.md`, so DVC's declared outputs exist;
- `metrics/train.json` (`summary`, see `train_summary`) and `plots/train_loss.csv`.
"""

from __future__ import annotations

import csv
import io
import logging
import resource
import sys
from pathlib import Path

from tunepipe.config import Config
from tunepipe.io_utils import atomic_dir, write_json_atomic, write_text_atomic
from tunepipe.layout import Layout

log = logging.getLogger(__name__)

LOSS_CSV = "train_loss.csv"
LOSS_PNG = "training_loss.png"
TRAIN_METRICS = "train.json"


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak GPU memory where there is a GPU)."""
    import torch

    # ru_maxrss is kilobytes on Linux, bytes on macOS
    scale = 1 / (1 << 20) if sys.platform == "darwin" else 1 / 1024
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)}
    if torch.cuda.is_available():
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
    return peak


def train_summary(result, state, tokens_at_start: int) -> dict:
    """metrics/train.json: final loss, steps, tokens, real tokens/s, runtime, peak memory."""
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    runtime = float(result.metrics.get("train_runtime", 0.0))
    session_tokens = state.num_input_tokens_seen - tokens_at_start
    summary = {
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": round(session_tokens / runtime, 2) if runtime > 0 else None,
        "runtime_s": round(runtime, 2),
        **peak_memory_mb(),
    }
    if evals:
        summary["eval_loss"] = evals[-1]
    return summary


def loss_points(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]


def write_outputs(cfg: Config, layout: Layout, model, tokenizer, summary: dict,
                  log_history: list[dict], tracker=None, state_dict=None) -> Path:
    """Write every train-stage output; returns the trained dir. `state_dict`: the full weights
    gathered from a sharded (FSDP / DeepSpeed) model, saved instead of the model's own shards."""
    trained = layout.trained(cfg.train.finetuning_type)
    unused = layout.full if trained == layout.adapter else layout.adapter
    points = loss_points(log_history)
    with atomic_dir(trained) as tmp:
        save_weights(model, tmp, cfg.train.finetuning_type, state_dict)
        tokenizer.save_pretrained(str(tmp))
        write_record(tmp, cfg, tracker)
        if cfg.train.plot_loss:
            plot_loss(points, tmp / LOSS_PNG)
    with atomic_dir(unused) as tmp:
        (tmp / "NOT_USED.md").write_text(
            f"Not used: train.finetuning_type={cfg.train.finetuning_type} writes {trained.name}/ instead.\n"
            "This placeholder exists because the DVC train stage declares both dirs as outputs.\n",
            encoding="utf-8")
    write_json_atomic(layout.metrics / TRAIN_METRICS, summary)
    write_text_atomic(layout.plots / LOSS_CSV, loss_csv(points))
    log.info("trained weights in %s; metrics in %s", trained, layout.metrics / TRAIN_METRICS)
    return trained


def save_weights(model, out_dir: Path, finetuning_type: str, state_dict=None) -> None:
    if finetuning_type in ("lora", "oft"):
        from tunepipe.train.model.adapters import save_adapter

        save_adapter(model, out_dir, state_dict)
        return
    model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state_dict)


def write_record(out_dir: Path, cfg: Config, tracker) -> None:
    """`tunepipe_run.json` (the MLflow run later stages join, and what was trained)."""
    from tunepipe.tracking.tracker import Tracker, write_run_record

    write_run_record(out_dir, cfg, tracker if tracker is not None else Tracker.disabled())


def loss_csv(points: list[tuple[int, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss"])
    writer.writerows(points)
    return buffer.getvalue()


def plot_loss(points: list[tuple[int, float]], path: Path) -> None:
    """training_loss.png: the logged loss and an exponential moving average over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for step, _ in points]
    losses = [loss for _, loss in points]
    smoothed, current = [], None
    for loss in losses:
        current = loss if current is None else 0.9 * current + 0.1 * loss
        smoothed.append(current)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, losses, alpha=0.4, label="loss")
    axis.plot(steps, smoothed, label="smoothed")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("training loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
