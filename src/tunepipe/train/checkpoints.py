"""Which checkpoint a run continues from, and whether it is still intact.

The Trainer writes `checkpoints/checkpoint-N/`; `CheckpointManifest` (a TrainerCallback)
then records every file of it with its size and sha256 in `tunepipe_manifest.json`, the
last file written. On the next run `resume_checkpoint` takes the newest checkpoint whose
files still match their manifest, removes the ones that do not (a run killed while saving,
a disk that filled up, a file damaged later) with one warning line, and starts over when
none is left. `checkpoints/tunepipe_resume.json` holds the run key (what a checkpoint must
share with this run to be resumed) and, once the outputs are written, what they were, so
that a finished run run again trains nothing (`finished_summary`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from tunepipe.config import Config
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import read_json, write_json_atomic
from tunepipe.layout import Layout

log = logging.getLogger(__name__)

RESUME_KEY = "tunepipe_resume.json"
MANIFEST = "tunepipe_manifest.json"
STATE = "trainer_state.json"
# train.* keys that do not change the optimisation trajectory: a checkpoint written under
# other values of these is still a valid starting point.
NOT_TRAJECTORY = {"output_dir", "overwrite_output_dir", "logging_steps", "save_steps", "save_total_limit",
                  "eval_strategy", "eval_steps", "per_device_eval_batch_size", "plot_loss",
                  "resume_from_checkpoint", "restore_callback_states_from_checkpoint", "do_train",
                  "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                  # where Ray places the workers and keeps its record (ray_num_workers does count)
                  "resources_per_worker", "placement_strategy", "ray_storage_path", "ray_run_name",
                  "ray_init_kwargs"}
# model.* keys the train stage reads (the base model itself is identified by its manifest)
MODEL_KEYS = ("quantization_bit", "quantization_type", "double_quantization", "flash_attn", "trust_remote_code")


def run_key(cfg: Config, layout: Layout, data_fingerprint: str | None) -> str:
    """What a checkpoint must share with this run to be resumed: the base model, the model
    and trajectory knobs, the data (fingerprint of the tokenized shards) and tunepipe's code
    (so that `dvc repro` after a code change trains with the new code, as DVC users expect)."""
    from tunepipe.models.base import MANIFEST as BASE_MANIFEST

    manifest = layout.base_model / BASE_MANIFEST
    train = {k: v for k, v in asdict(cfg.train).items() if k not in NOT_TRAJECTORY}
    model = {k: getattr(cfg.model, k) for k in MODEL_KEYS}
    payload = json.dumps({"base": manifest.read_text(encoding="utf-8") if manifest.is_file() else None,
                          "model": model, "train": train, "data": data_fingerprint, "code": code_fingerprint()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def code_fingerprint() -> str:
    """sha256 over the tunepipe package's Python sources (paths and bytes)."""
    import tunepipe

    package = Path(tunepipe.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- manifests


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:  # hashlib.file_digest needs Python 3.11
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under `folder` (the manifest left out)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return files


def write_manifest(checkpoint: Path) -> None:
    write_json_atomic(checkpoint / MANIFEST, {"files": describe_files(checkpoint)})


def damage(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed (first problem found), or None when it is intact."""
    try:
        files = read_json(checkpoint / MANIFEST)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no manifest (its save did not finish)"
    for name, want in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is {size:,} bytes, {want['size']:,} when saved"
        if file_digest(path) != want["sha256"]:
            return f"{name} changed since it was saved (sha256 differs)"
    return None


class CheckpointManifest(TrainerCallback):
    """After each checkpoint save: record its files (sizes + sha256) as its last file.

    Also knows when a save is under way (the Trainer saves right after `on_step_end` asked
    for it, and calls `on_save` when done), so that a failure there can be told apart from
    one in training: see `save_failed`. Put it after every callback that sets `should_save`."""

    def __init__(self):
        self.saving: Path | None = None  # the checkpoint being written, between step end and on_save

    def on_step_end(self, args, state, control, **kwargs):
        self.saving = Path(args.output_dir) / f"checkpoint-{state.global_step}" if control.should_save else None

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's part of the checkpoint is on disk before it is hashed
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            write_manifest(checkpoint)
        self.saving = None


def save_failed(checkpoint: Path, exc: BaseException) -> TunepipeError:
    """A checkpoint save that raised (a full disk, most often): the half-written checkpoint is
    removed, and the error says what the next run will resume from."""
    from tunepipe.errors import disk_full_cause

    shutil.rmtree(checkpoint, ignore_errors=True)
    full = disk_full_cause(exc)
    free = shutil.disk_usage(checkpoint.parent).free if checkpoint.parent.is_dir() else 0
    cause = f"out of disk space ({full.strerror})" if full else f"{type(exc).__name__}: {_first_line(exc)}"
    kept = [c.name for c in checkpoints_newest_first(checkpoint.parent) if damage(c) is None]
    resume = f"resumes from {kept[0]}" if kept else "starts from the beginning"
    limits = "" if full else " (a quota or a file-size limit stops writes too)"
    return TunepipeError(f"saving {checkpoint} failed: {cause}; {free / 2**20:,.0f} MiB free there{limits}. "
                         "The partial checkpoint was removed.",
                         hint=f"free some space and run the same command again: it {resume}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------- resume


def checkpoints_newest_first(folder: Path) -> list[Path]:
    found = [(int(p.name.split("-", 1)[1]), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-", 1)[1].isdigit()] if folder.is_dir() else []
    return [path for _, path in sorted(found, reverse=True)]


def intact_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest. Newer ones that do not are
    removed (so the Trainer never rotates or overwrites into them), with one warning line."""
    removed = []
    for checkpoint in checkpoints_newest_first(folder):
        why = damage(checkpoint)
        if why is None:
            if removed:
                log.warning("removed damaged %s; resuming from %s", "; ".join(removed), checkpoint.name)
            return checkpoint
        removed.append(f"{checkpoint.name} ({why})")
        shutil.rmtree(checkpoint, ignore_errors=True)
    if removed:
        log.warning("removed damaged %s; no intact checkpoint left: starting over", "; ".join(removed))
    return None


def resume_checkpoint(cfg: Config, layout: Layout, data_fingerprint: str | None) -> str | None:
    """The checkpoint to continue from, or None to start fresh (stale checkpoints removed).

    Default (`resume_from_checkpoint` unset): the newest intact checkpoint in `checkpoints/`
    when it was written by a run with the same model, trajectory knobs and data; a path
    resumes from that checkpoint; `false` or `overwrite_output_dir: true` always start over."""
    train, folder = cfg.train, layout.checkpoints
    wanted = train.resume_from_checkpoint
    if isinstance(wanted, str):
        return explicit_checkpoint(Path(wanted))
    key = run_key(cfg, layout, data_fingerprint)
    recorded = (read_record(folder) or {}).get("run_key")
    overwrite = wanted is False or train.overwrite_output_dir
    if recorded == key and not overwrite:
        last = intact_checkpoint(folder)
        if last is not None:
            log.info("resuming from %s", last)
            return str(last)
    if wanted is True:
        raise TunepipeError(f"train.resume_from_checkpoint=true: no checkpoint of this run in {folder}")
    if checkpoints_newest_first(folder):
        why = "overwrite requested" if overwrite else \
            "they belong to a run with other params or data" if recorded != key else "none is intact"
        log.info("not resuming from %s (%s): starting over", folder, why)
    if _is_main_rank():  # every rank decides alike; one clears, or a rank's rmtree races another's write
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / RESUME_KEY, {"run_key": key})
    return None


def _is_main_rank() -> bool:
    """Rank 0 of a launched run's process group (torchrun, accelerate, Ray Train), or a lone process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def explicit_checkpoint(path: Path) -> str:
    """`resume_from_checkpoint: <path>`: that checkpoint, refused when damaged."""
    if not (path / STATE).is_file():
        raise TunepipeError(f"train.resume_from_checkpoint={str(path)!r}: not a checkpoint dir (no {STATE})")
    why = damage(path) if (path / MANIFEST).is_file() else None  # other tools' checkpoints have none
    if why:
        raise TunepipeError(f"train.resume_from_checkpoint={str(path)!r} is damaged: {why}",
                            hint="point it at an older checkpoint, or remove the key to start over")
    return str(path)


def is_last_step(checkpoint: str | Path) -> bool:
    """True when the checkpoint was saved at the run's final step (nothing left to train)."""
    try:
        state = read_json(Path(checkpoint) / STATE)
        return 0 < int(state["max_steps"]) <= int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------- finished runs


def read_record(folder: Path) -> dict | None:
    try:
        record = read_json(folder / RESUME_KEY)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def output_files(layout: Layout, trained: Path) -> dict[str, dict]:
    """The files a finished run left (trained dir, metrics, loss csv) with sizes and hashes."""
    from tunepipe.train.outputs import LOSS_CSV, TRAIN_METRICS

    files = {f"{trained.relative_to(layout.root).as_posix()}/{name}": entry
             for name, entry in describe_files(trained).items()} if trained.is_dir() else {}
    for path in (layout.metrics / TRAIN_METRICS, layout.plots / LOSS_CSV):
        if path.is_file():
            files[path.relative_to(layout.root).as_posix()] = {"size": path.stat().st_size,
                                                               "sha256": file_digest(path)}
    return files


def record_finished(cfg: Config, layout: Layout, trained: Path) -> None:
    """After the outputs are written: remember them, so a rerun knows there is nothing to do."""
    record = read_record(layout.checkpoints) or {}
    record["finished"] = {"outputs": output_files(layout, trained)}
    write_json_atomic(layout.checkpoints / RESUME_KEY, record)


def finished_summary(cfg: Config, layout: Layout, data_fingerprint: str | None) -> dict | None:
    """metrics/train.json of a finished run of this very config whose outputs are untouched,
    else None (train, resume, or re-derive the outputs from the final checkpoint)."""
    from tunepipe.train.outputs import TRAIN_METRICS

    if cfg.train.overwrite_output_dir or cfg.train.resume_from_checkpoint is False:
        return None
    record = read_record(layout.checkpoints) or {}
    finished = record.get("finished")
    if not finished or record.get("run_key") != run_key(cfg, layout, data_fingerprint):
        return None
    if output_files(layout, layout.trained(cfg.train.finetuning_type)) != finished.get("outputs"):
        return None
    return read_json(layout.metrics / TRAIN_METRICS)
