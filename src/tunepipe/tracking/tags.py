"""The tags that make a run findable: code version, DVC experiment, data fingerprint.

Kept apart from `tracking.py` because none of it needs MLflow: each tag is read from the
environment (git, DVC's env vars, the tokenized shards on disk) and is plain text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path

from tunepipe.config import Config
from tunepipe.layout import Layout

log = logging.getLogger(__name__)

# `dvc exp run` passes the experiment's name to every stage command in this variable
# (dvc/repo/experiments/queue/base.py puts DVC_EXP_NAME into the run env).
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
_CHUNK = 1 << 20


def run_tags(cfg: Config, layout: Layout) -> dict[str, str]:
    tags = {
        "tunepipe.stage": cfg.train.stage,
        "tunepipe.finetuning_type": cfg.train.finetuning_type,
        "tunepipe.base_model": cfg.model.model_name_or_path,
        "tunepipe.dataset": ",".join(cfg.data.datasets()),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # the field the MLflow UI shows
    exp_name = os.environ.get(DVC_EXP_NAME_ENV)
    if exp_name:
        tags["dvc_exp_name"] = exp_name
    fingerprint = data_fingerprint(layout.tokenized)
    if fingerprint:
        tags["data_fingerprint"] = fingerprint
    return {**tags, **hub_tags(layout)}


def hub_tags(layout: Layout) -> dict[str, str]:
    """Where a Hub model and Hub datasets came from: repo, requested revision, resolved commit,
    as models/base/'s manifest and reports/validation.json recorded them."""
    tags = {}
    manifest = _json_or_none(layout.base_model / "tunepipe_base.json") or {}
    source = manifest.get("source") or {}
    if source.get("kind") == "hub":
        tags.update({"tunepipe.base_model.repo_id": source["repo_id"],
                     "tunepipe.base_model.revision": source["revision"],
                     "tunepipe.base_model.commit": source["commit"]})
    report = _json_or_none(layout.reports / "validation.json") or {}
    for name, summary in (report.get("datasets") or {}).items():
        hub = summary.get("hub") if isinstance(summary, dict) else None
        if hub:
            tags[f"tunepipe.dataset.{name}.repo_id"] = hub["repo_id"]
            tags[f"tunepipe.dataset.{name}.commit"] = hub["commit"]
    return tags


def _json_or_none(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the git repo around `cwd` (default: the process cwd), or None outside one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def data_fingerprint(tokenized_dir: str | Path) -> str | None:
    """sha256 over the tokenized shards' relative paths and bytes (16 hex digits), None if absent.

    Two runs with the same fingerprint trained on byte-identical shards, whatever the raw
    files or params that produced them.
    """
    root = Path(tokenized_dir)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_data(p.relative_to(root)))
    if not files:
        return None
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _is_data(relative: Path) -> bool:
    # Hidden files are temporary siblings of atomic writes. datasets' state.json is bookkeeping
    # (a fingerprint of the transform history that can differ for byte-identical shards).
    return not any(part.startswith(".") for part in relative.parts) and relative.name != "state.json"
