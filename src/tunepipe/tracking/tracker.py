"""MLflow tracking: one run per pipeline execution, started by train, joined by evaluate and merge.

The train stage calls `Tracker.start(cfg, layout)` and writes the run id beside the trained
weights (`tunepipe_run.json`, see `write_run_record`); evaluate and merge call
`Tracker.join(cfg, trained_dir)` and log into the same run, so one run holds the params,
the per-step curves, the eval metrics and the export info side by side in `mlflow ui`.

Tracking must never cost the training: every store call goes through `_guarded`, and the
first failure logs one warning and turns the tracker into a no-op for the rest of the run.
We talk to `MlflowClient` directly instead of the fluent `mlflow.start_run` API because the
fluent API keeps a process-global active run, which a joined run or a test with two
trackers would fight over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunepipe.config import GROUPS, SECRET_KEYS, Config, TrackingConfig
from tunepipe.io_utils import read_json, write_json_atomic
from tunepipe.layout import Layout
from tunepipe.tracking.tags import run_tags

log = logging.getLogger(__name__)

RUN_RECORD = "tunepipe_run.json"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow's per-request limits (mlflow.utils.validation); params go in chunks of this size.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


# ---------------------------------------------------------------------------- the store


def configured_tracking_uri(tracking: TrackingConfig) -> str:
    """The store as the user named it: `tracking.tracking_uri`, else MLFLOW_TRACKING_URI, else the default."""
    return tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute, against the repo root DVC names or else the cwd.

    MLflow resolves `sqlite:///mlflow.db` against the cwd at every open; pinning it once means
    every stage of one pipeline writes the same file, and `dvc exp run --temp` (which runs in a
    scratch copy but sets DVC_ROOT to the user's repo) writes the user's store, not the copy's.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = uri[len(prefix):]
    if not path or path.startswith(("/", ":memory:")):
        return uri
    base = os.environ.get("DVC_ROOT") or os.getcwd()
    return prefix + str((Path(base) / path).resolve())


def artifact_location(resolved_uri: str, experiment_name: str) -> str | None:
    """Artifacts of a sqlite store live beside the .db file (MLflow's default is ./mlruns of the cwd)."""
    prefix = "sqlite:///"
    if not resolved_uri.startswith(prefix) or resolved_uri.startswith(prefix + ":memory:"):
        return None  # a server or other store chooses its own artifact root
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment_name)
    return (Path(resolved_uri[len(prefix):]).parent / "mlartifacts" / safe).as_uri()


def _quiet_mlflow() -> None:
    # Store creation logs alembic migrations and "creating tables" at INFO on every fresh db.
    # Called after `import mlflow`, which sets its own logger's level when imported.
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _client(resolved_uri: str):
    from mlflow import MlflowClient

    _quiet_mlflow()
    with _store_creation_lock(resolved_uri):
        return MlflowClient(tracking_uri=resolved_uri)


def _store_creation_lock(resolved_uri: str):
    """Opening a sqlite store creates and migrates its tables; two processes doing it at the same
    moment collide ("table experiments already exists", alembic row mismatches) and one loses
    its tracking. A file lock beside the .db file makes them take turns; other stores need none."""
    import contextlib

    prefix = "sqlite:///"
    if not resolved_uri.startswith(prefix) or resolved_uri.startswith(prefix + ":memory:"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db_file = Path(resolved_uri[len(prefix):])
    db_file.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db_file) + ".lock", timeout=600)


def _experiment_id(client, name: str, resolved_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(resolved_uri, name))
        except Exception:  # another process created it between our two calls
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# ---------------------------------------------------------------------------- params


def flatten_params(cfg: Config) -> dict[str, str]:
    """Every field of every group as `group.key` -> text, e.g. `train.lora_rank` -> `8`; a secret
    (`model.hf_hub_token`) is left out, not masked: even its presence is nobody's business."""
    params = {}
    for group in GROUPS:
        for key, value in dataclasses.asdict(getattr(cfg, group)).items():
            if f"{group}.{key}" not in SECRET_KEYS:
                params[f"{group}.{key}"] = param_text(value)
    return params


def param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return truncate(text, _max_param_length())


def truncate(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters, saying so, instead of letting MLflow reject the whole batch."""
    marker = "...[truncated]"
    if len(text) <= limit:
        return text
    return text[: limit - len(marker)] + marker


def _max_param_length() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:
        return 500  # MLflow's historic limit, accepted by every server version
    return MAX_PARAM_VAL_LENGTH


# ---------------------------------------------------------------------------- rank


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (RANK is the global rank), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------- the tracker


class Tracker:
    """One MLflow run, or a no-op when tracking is off, not rank 0, or the store failed."""

    def __init__(self, client=None, run_id: str | None = None, configured_uri: str | None = None,
                 resolved_uri: str | None = None):
        self._client = client
        self.run_id = run_id
        self.configured_uri = configured_uri
        self.tracking_uri = resolved_uri

    # -- construction

    @classmethod
    def disabled(cls) -> Tracker:
        return cls()

    @classmethod
    def start(cls, cfg: Config, layout: Layout) -> Tracker:
        """Create the run: every config group flattened as params, plus the tags of `run_tags`."""
        if cfg.tracking.report_to == "none":
            log.info("tracking off (tracking.report_to: none)")
            return cls.disabled()
        if not is_main_process():
            return cls.disabled()
        configured = configured_tracking_uri(cfg.tracking)
        tracker = cls(configured_uri=configured, resolved_uri=resolve_tracking_uri(configured))
        tracker._guarded("start a run", lambda: tracker._open_new_run(cfg, layout))
        return tracker

    @classmethod
    def join(cls, cfg: Config, trained_dir: str | Path) -> Tracker:
        """Log into the run the train stage recorded in `trained_dir/tunepipe_run.json`."""
        if cfg.tracking.report_to == "none" or not is_main_process():
            return cls.disabled()
        record = read_run_record(trained_dir)
        if not record or not record.get("mlflow_run_id"):
            log.info("no MLflow run recorded in %s (trained with tracking off): not tracking",
                     Path(trained_dir) / RUN_RECORD)
            return cls.disabled()
        # The run lives in the store it was created in; the record keeps that store as the user
        # named it (e.g. relative sqlite), so a moved or cloned repo still finds its own store.
        configured = record.get("tracking_uri") or configured_tracking_uri(cfg.tracking)
        tracker = cls(configured_uri=configured, resolved_uri=resolve_tracking_uri(configured))
        tracker._guarded("join the train run", lambda: tracker._open_existing_run(record["mlflow_run_id"]))
        return tracker

    def _open_new_run(self, cfg: Config, layout: Layout) -> None:
        client = _client(self.tracking_uri)
        experiment_id = _experiment_id(client, cfg.tracking.experiment_name, self.tracking_uri)
        run = client.create_run(experiment_id, run_name=default_run_name(cfg), tags=run_tags(cfg, layout))
        self._client, self.run_id = client, run.info.run_id
        params = sorted(flatten_params(cfg).items())
        self._log_batch(params=[_param(key, value) for key, value in params])
        log.info("MLflow run %s in %s", self.run_id, self.tracking_uri)

    def _open_existing_run(self, run_id: str) -> None:
        client = _client(self.tracking_uri)
        client.get_run(run_id)  # fails here, once, if the store lost the run
        self._client, self.run_id = client, run_id

    # -- logging

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numeric values only (bools, None and text are skipped); `step` defaults to 0."""
        if not self.enabled:
            return
        timestamp = int(time.time() * 1000)
        entries = [_metric(key, float(value), timestamp, step or 0)
                   for key, value in metrics.items() if _is_number(value)]
        if entries:
            self._guarded("log metrics", lambda: self._log_batch(metrics=entries))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        entries = [_tag(key, truncate(str(value), 5000)) for key, value in tags.items()]
        self._guarded("set tags", lambda: self._log_batch(tags=entries))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (a plot, a stats JSON, adapter_config.json). Directories are refused:
        artifacts stay small by construction, and a checkpoint or weights dir never goes up."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            log.warning("not logging directory %s as an MLflow artifact (files only)", path)
            return
        if not path.is_file():
            log.debug("artifact %s does not exist; skipped", path)
            return
        self._guarded(f"log artifact {path.name}",
                      lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A small table (column -> values) as MLflow's JSON table artifact, shown as a table in the
        run's artifacts (GRPO's sampled completions with their rewards)."""
        if not self.enabled:
            return
        self._guarded(f"log table {artifact_file}",
                      lambda: self._client.log_table(self.run_id, data=columns, artifact_file=artifact_file))

    def end(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self.enabled:
            self._guarded("end the run", lambda: self._client.set_terminated(self.run_id, status))

    def callback(self):
        """A transformers TrainerCallback logging each logging step into this run."""
        from tunepipe.tracking.callback import TrackingCallback

        return TrackingCallback(self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- plumbing

    def _log_batch(self, metrics=(), params=(), tags=()) -> None:
        for start in range(0, len(params), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[start:start + _PARAMS_PER_BATCH])
        for start in range(0, len(tags), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=tags[start:start + _PARAMS_PER_BATCH])
        for start in range(0, len(metrics), _METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start:start + _METRICS_PER_BATCH])

    def _guarded(self, what: str, action: Callable[[], None]) -> None:
        """Run a store call; the first failure warns once and turns this tracker into a no-op."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - any store failure (disk, network, schema) must not stop training
            log.warning("MLflow tracking disabled: could not %s in %s: %s: %s",
                        what, self.tracking_uri, type(exc).__name__, _first_line(exc))
            self._client = None


def default_run_name(cfg: Config) -> str:
    """tracking.run_name, else the DVC experiment's name, else stage-method-time."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    return f"{cfg.train.stage}-{cfg.train.finetuning_type}-{time.strftime('%Y%m%d-%H%M%S')}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _metric(key, value, timestamp, step):
    from mlflow.entities import Metric

    return Metric(key, value, timestamp, step)


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, value)


def _tag(key, value):
    from mlflow.entities import RunTag

    return RunTag(key, value)


# ---------------------------------------------------------------------------- the run record


def run_record(cfg: Config, tracker: Tracker) -> dict[str, Any]:
    """What `tunepipe_run.json` holds: the run to join and what was trained.

    A run the store created keeps its id here even if the store failed later in training:
    the run exists, and evaluate may reach the store again.
    """
    return {
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.configured_uri if tracker.run_id else None,
        "stage": cfg.train.stage,
        "finetuning_type": cfg.train.finetuning_type,
        "quantization_bit": cfg.model.quantization_bit,
        "base_model": cfg.model.model_name_or_path,
    }


def write_run_record(trained_dir: str | Path, cfg: Config, tracker: Tracker) -> Path:
    """Write `tunepipe_run.json` into the trained dir (call it inside the atomic output dir)."""
    path = Path(trained_dir) / RUN_RECORD
    write_json_atomic(path, run_record(cfg, tracker))
    return path


def read_run_record(trained_dir: str | Path) -> dict[str, Any] | None:
    path = Path(trained_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("unreadable %s: %s", path, exc)
        return None
    return record if isinstance(record, dict) else None


def join_train_run(cfg: Config, record_dir: Path | None) -> Tracker | None:
    """The train stage's MLflow run (None when nothing was trained) to log eval / export figures into."""
    if record_dir is None:
        return None
    return Tracker.join(cfg, record_dir)
