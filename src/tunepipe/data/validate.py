"""The validate stage: every dataset named by `data.dataset` / `data.eval_dataset`, checked
row by row against its JSON Schema and the semantic rules (`row_checks`), written as
canonical rows to `data/validated/` with a row-precise report.

`data.on_invalid: error` (default) stops with exit code 2 and the first errors, each
with file:row and a JSON pointer into the user's own row; `drop` keeps going and
writes every dropped row, unchanged, with its reasons to `reports/rejected.jsonl`.
File-level problems (missing file or column, empty dataset, malformed JSON array,
non-UTF-8 bytes) are always errors: a whole file cannot be dropped silently.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from tunepipe.config import Config, ModelConfig
from tunepipe.data.checks.row_checks import check_view, problem_record
from tunepipe.data.checks.validated import KINDS_FOR_STAGE, ValidatedWriter
from tunepipe.data.sources.formats import Mapper
from tunepipe.data.sources.hub_data import resolve as resolve_hub
from tunepipe.data.sources.hub_data import stream_rows
from tunepipe.data.sources.media import MEDIA_STORE, MediaChecker, refuse_unsupported
from tunepipe.data.sources.readers import RawRow, read_rows
from tunepipe.data.sources.registry import DatasetEntry, get_entries
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import write_json_atomic
from tunepipe.layout import Layout

log = logging.getLogger(__name__)

REPORT = "validation.json"
REJECTED = "rejected.jsonl"
ERRORS_IN_FULL = 100
ERRORS_SHOWN = 5
KIND_HINT = {"preference": "a preference dataset has \"ranking\": true and chosen/rejected columns",
             "kto": "a KTO dataset maps a kto_tag column (\"columns\": {\"kto_tag\": ...})",
             "sft": "an SFT dataset has neither \"ranking\" nor a kto_tag column",
             "pretrain": "any dataset can be read as text"}


@dataclass
class DatasetResult:
    entry: DatasetEntry
    kind: str
    rows_read: int = 0
    valid: int = 0  # canonical rows written
    invalid_count: int = 0
    invalid: list[dict] = field(default_factory=list)  # the first ERRORS_IN_FULL records of invalid rows
    commit: str | None = None  # a hub dataset's resolved commit sha
    media: MediaChecker | None = None  # set when the entry maps images / videos

    def summary(self, dataset_dir: Path) -> dict:
        summary = {"kind": self.kind, "formatting": self.entry.formatting,
                   "files": [str(dataset_dir / f) for f in _relative_files(self.entry, dataset_dir)],
                   "rows_read": self.rows_read, "valid": self.valid, "invalid": self.invalid_count,
                   "errors": self.invalid[:ERRORS_IN_FULL],
                   "errors_not_shown": max(0, self.invalid_count - ERRORS_IN_FULL)}
        if self.media is not None:
            summary["media"] = {**self.media.counts, "files_checked": len(self.media.checked),
                                "rows_with_placeholders_prepended": self.media.prepended}
        hub = self.entry.hub
        if hub is not None:
            summary["hub"] = {"repo_id": hub.repo_id, "subset": hub.subset, "split": hub.split,
                              "folder": hub.folder, "revision": hub.revision, "commit": self.commit}
        return summary


@dataclass
class Sinks:
    """Where rows go as they are checked: valid ones to data/validated/, invalid ones to the
    rejected file (a temporary sibling until validation succeeds)."""

    validated: ValidatedWriter
    rejected: object  # an open text file
    dumps: object = json.dumps


def run_validate(cfg: Config, layout: Layout) -> dict:
    """Validate every dataset; write data/validated/, reports/validation.json, reports/rejected.jsonl.
    Rows stream from the raw files to the outputs one at a time."""
    stage, dataset_dir = cfg.train.stage, Path(cfg.data.dataset_dir)
    splits = {"train": cfg.data.datasets(), "eval": cfg.data.eval_datasets()}
    results: dict[str, DatasetResult] = {}
    layout.reports.mkdir(parents=True, exist_ok=True)
    rejected_tmp = layout.reports / f".{REJECTED}.tmp-{os.getpid()}"
    try:
        with ValidatedWriter(layout.validated, stage) as out, open(rejected_tmp, "w", encoding="utf-8") as rejected:
            sinks = Sinks(out, rejected)
            for entry in get_entries(list(dict.fromkeys(splits["train"] + splits["eval"])), dataset_dir):
                results[entry.name] = validate_dataset(entry, stage, dataset_dir, sinks, cfg.model,
                                                       Path(cfg.data.media_dir or dataset_dir))
            report = build_report(cfg, splits, results, dataset_dir)
            write_json_atomic(layout.reports / REPORT, report)
            check_outcome(cfg, results, layout)
            out.finish(splits, {name: {"kind": r.kind, "num_samples": r.entry.num_samples}
                                for name, r in results.items()})
        os.replace(rejected_tmp, layout.reports / REJECTED)
    finally:
        rejected_tmp.unlink(missing_ok=True)
    for name, result in results.items():
        log.info("%s: %d rows valid, %d dropped", name, result.valid, result.invalid_count)
    return report


def check_outcome(cfg: Config, results: dict[str, DatasetResult], layout: Layout) -> None:
    bad = {name: r for name, r in results.items() if r.invalid_count}
    if bad and cfg.data.on_invalid == "error":
        raise TunepipeError(error_summary(bad, layout),
                            hint=f"fix those rows, or set data.on_invalid: drop to skip them (they are kept in "
                                 f"{layout.reports / REJECTED}); every error is listed in {layout.reports / REPORT}")
    for name, result in results.items():
        if not result.valid:
            raise TunepipeError(f"dataset {name!r}: no valid rows left out of {result.rows_read} "
                                f"(see {layout.reports / REPORT})")


def validate_dataset(entry: DatasetEntry, stage: str, dataset_dir: Path, sinks: Sinks,
                     model_cfg: ModelConfig | None = None, media_dir: Path | None = None) -> DatasetResult:
    """One dataset's rows; a hub dataset is read at the commit its revision names now (recorded),
    with `model_cfg`'s token and cache dir. Media paths resolve against `media_dir` (default: dataset_dir)."""
    kind = entry.kind(stage)
    needed = KINDS_FOR_STAGE[stage]
    if kind != needed:
        raise TunepipeError(f"dataset {entry.name!r} holds {kind} rows but train.stage={stage} needs {needed} rows",
                            hint=KIND_HINT[needed])
    mapper = Mapper(entry, kind)
    result = DatasetResult(entry, kind)
    refuse_unsupported(entry.name, entry.user_columns)
    if entry.media:
        if kind == "pretrain":
            raise TunepipeError(f"dataset {entry.name!r} maps {', '.join(entry.media)}: media in stage pt "
                                "(multimodal pretraining) is not supported yet", hint="use train.stage: sft")
        result.media = MediaChecker(media_dir or dataset_dir, store=sinks.validated.tmp / MEDIA_STORE)
    sinks.validated.open(entry.name)
    if entry.hub is not None:
        token, cache_dir = (model_cfg.hf_hub_token, model_cfg.cache_dir) if model_cfg else (None, None)
        result.commit = resolve_hub(entry.hub, token, cache_dir)
        log.info("dataset %r: %s at commit %s", entry.name, entry.hub.shown(), result.commit)
        validate_file(mapper, stream_rows(entry.hub, result.commit, token, cache_dir), entry.hub.shown(),
                      result, sinks)
    for path, shown in zip(entry.files, _relative_files(entry, dataset_dir)):
        validate_file(mapper, read_rows(path, entry.file_type, str(dataset_dir / shown)), str(dataset_dir / shown),
                      result, sinks)
    if result.rows_read == 0:
        raise TunepipeError(f"dataset {entry.name!r}: {entry.describe_files(dataset_dir)} holds no rows")
    return result


def validate_file(mapper: Mapper, raw_rows: Iterator[RawRow], shown: str, result: DatasetResult,
                  sinks: Sinks) -> None:
    """Check a file's rows as they are read. A column the kind needs (or the entry names) that
    no row has is one error, not one per row: the first 1000 rows name the columns found, and
    a needed column missing from them is looked for in every later row."""
    head = list(itertools.islice(raw_rows, 1000))
    keys: set = set()
    for raw in head:
        if isinstance(raw.data, dict):
            keys.update(raw.data)
    missing = missing_columns(mapper, keys) if keys else {}
    progress = tqdm(desc=f"validate {mapper.entry.name}", unit="row", disable=None, mininterval=2)
    with progress:
        for raw in itertools.chain(head, raw_rows):
            result.rows_read += 1
            if missing and isinstance(raw.data, dict):
                missing = {logical: column for logical, column in missing.items() if column not in raw.data}
            check_raw_row(mapper, raw, result, sinks)
            progress.update()
    if missing:
        logical, column = next(iter(missing.items()))
        raise TunepipeError(
            f"dataset {mapper.entry.name!r}: {shown}: column {column!r} ({logical}) is missing from every row; "
            f"columns found: {', '.join(sorted(map(str, keys)))}",
            hint=f"map it in dataset_info.json: \"columns\": {{\"{logical}\": \"<column name>\"}}")


def check_raw_row(mapper: Mapper, raw: RawRow, result: DatasetResult, sinks: Sinks) -> None:
    if raw.error is not None:
        problems = [{"pointer": "", "message": raw.error}]
    elif not isinstance(raw.data, dict):
        problems = [{"pointer": "", "message": f"a row must be a JSON object, got {type(raw.data).__name__}"}]
    else:
        view = mapper.view(raw.data)
        found = check_view(mapper, view)
        row = mapper.canonical(view) if not found else None
        if row is not None and result.media is not None:
            found = result.media.attach(row, raw.data, mapper.entry.columns, ["messages" if mapper.chat else "prompt"])
        if not found:
            row["_source"] = f"{raw.file}:{raw.index}"
            sinks.validated.add(mapper.entry.name, row)
            result.valid += 1
            return
        problems = [problem_record(mapper, raw.data, p) for p in found]
    record = {"file": raw.file, "row": raw.index, **({"line": raw.line} if raw.line is not None else {}),
              **problems[0]}
    if len(problems) > 1:
        record["other_errors"] = problems[1:]
    result.invalid_count += 1
    if len(result.invalid) < ERRORS_IN_FULL:
        result.invalid.append(record)
    kept = {"data": raw.data} if raw.error is None else {"raw_text": raw.raw_text}
    sinks.rejected.write(sinks.dumps({"dataset": result.entry.name, **record, **kept}, ensure_ascii=False) + "\n")


def missing_columns(mapper: Mapper, keys: set) -> dict[str, str]:
    """The needed columns (logical name -> column) that none of `keys` names, in the order checked."""
    entry = mapper.entry
    wanted = [c for c in mapper.required if c in entry.columns]
    wanted += [c for c in sorted(entry.user_columns) if c not in wanted and c in _used_columns(mapper)]
    return {logical: entry.columns[logical] for logical in wanted if entry.columns[logical] not in keys}


def _used_columns(mapper: Mapper) -> set[str]:
    if mapper.kind == "pretrain":
        return {"messages"} if mapper.chat else {"prompt", "query"}
    return {"messages", *(logical for logical, _ in mapper.top)} if mapper.chat else {l for l, _ in mapper.top}


def build_report(cfg: Config, splits: dict, results: dict[str, DatasetResult], dataset_dir: Path) -> dict:
    return {"stage": cfg.train.stage, "on_invalid": cfg.data.on_invalid,
            "train": splits["train"], "eval": splits["eval"],
            "rows_read": sum(r.rows_read for r in results.values()),
            "valid": sum(r.valid for r in results.values()),
            "invalid": sum(r.invalid_count for r in results.values()),
            "datasets": {name: r.summary(dataset_dir) for name, r in results.items()}}


def error_summary(bad: dict[str, DatasetResult], layout: Layout) -> str:
    total = sum(r.invalid_count for r in bad.values())
    lines = [f"{total} invalid row{'s' if total != 1 else ''} in {', '.join(bad)} (data.on_invalid: error)"]
    shown = [rec for r in bad.values() for rec in r.invalid][:ERRORS_SHOWN]
    for rec in shown:
        where = f"{rec['file']}:row {rec['row']}" + (f" (line {rec['line']})" if "line" in rec else "")
        lines.append(f"  {where}: {rec['pointer'] or '/'}: {rec['message']}")
    if total > len(shown):
        lines.append(f"  ... and {total - len(shown)} more")
    return "\n".join(lines)


def _relative_files(entry: DatasetEntry, dataset_dir: Path) -> list[str]:
    root = dataset_dir.resolve()
    return [str(f.resolve().relative_to(root)) for f in entry.files]
