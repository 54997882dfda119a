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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from tunepipe.config import Config
from tunepipe.data.formats import Mapper
from tunepipe.data.readers import RawRow, read_rows
from tunepipe.data.registry import DatasetEntry, get_entries
from tunepipe.data.row_checks import check_view, problem_record
from tunepipe.data.validated import KINDS_FOR_STAGE, write_validated
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import write_json_atomic, write_text_atomic
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
    rows: list[dict] = field(default_factory=list)  # canonical rows
    rows_read: int = 0
    invalid: list[dict] = field(default_factory=list)  # one record per invalid row
    rejected: list[dict] = field(default_factory=list)  # the rows themselves, for rejected.jsonl

    def summary(self, dataset_dir: Path) -> dict:
        return {"kind": self.kind, "formatting": self.entry.formatting,
                "files": [str(dataset_dir / f) for f in _relative_files(self.entry, dataset_dir)],
                "rows_read": self.rows_read, "valid": len(self.rows), "invalid": len(self.invalid),
                "errors": self.invalid[:ERRORS_IN_FULL],
                "errors_not_shown": max(0, len(self.invalid) - ERRORS_IN_FULL)}


def run_validate(cfg: Config, layout: Layout) -> dict:
    """Validate every dataset; write data/validated/, reports/validation.json, reports/rejected.jsonl."""
    stage, dataset_dir = cfg.train.stage, Path(cfg.data.dataset_dir)
    splits = {"train": cfg.data.datasets(), "eval": cfg.data.eval_datasets()}
    results: dict[str, DatasetResult] = {}
    for entry in get_entries(list(dict.fromkeys(splits["train"] + splits["eval"])), dataset_dir):
        results[entry.name] = validate_dataset(entry, stage, dataset_dir)
    report = build_report(cfg, splits, results, dataset_dir)
    layout.reports.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.reports / REPORT, report)
    bad = {name: r for name, r in results.items() if r.invalid}
    if bad and cfg.data.on_invalid == "error":
        raise TunepipeError(error_summary(bad, layout),
                            hint=f"fix those rows, or set data.on_invalid: drop to skip them (they are kept in "
                                 f"{layout.reports / REJECTED}); every error is listed in {layout.reports / REPORT}")
    for name, result in results.items():
        if not result.rows:
            raise TunepipeError(f"dataset {name!r}: no valid rows left out of {result.rows_read} "
                                f"(see {layout.reports / REPORT})")
    write_rejected(layout.reports / REJECTED, results)
    write_validated(layout.validated, stage, splits, {name: r.rows for name, r in results.items()},
                    {name: {"kind": r.kind, "num_samples": r.entry.num_samples} for name, r in results.items()})
    for name, result in results.items():
        log.info("%s: %d rows valid, %d dropped", name, len(result.rows), len(result.invalid))
    return report


def validate_dataset(entry: DatasetEntry, stage: str, dataset_dir: Path) -> DatasetResult:
    kind = entry.kind(stage)
    needed = KINDS_FOR_STAGE[stage]
    if kind != needed:
        raise TunepipeError(f"dataset {entry.name!r} holds {kind} rows but train.stage={stage} needs {needed} rows",
                            hint=KIND_HINT[needed])
    mapper = Mapper(entry, kind)
    result = DatasetResult(entry, kind)
    for path, shown in zip(entry.files, _relative_files(entry, dataset_dir)):
        raw_rows = read_rows(path, entry.file_type, str(dataset_dir / shown))
        check_columns(mapper, raw_rows, str(dataset_dir / shown))
        result.rows_read += len(raw_rows)
        for raw in tqdm(raw_rows, desc=f"validate {entry.name}", unit="row", disable=None, mininterval=2):
            check_raw_row(mapper, raw, result)
    if result.rows_read == 0:
        raise TunepipeError(f"dataset {entry.name!r}: {entry.describe_files(dataset_dir)} holds no rows")
    return result


def check_raw_row(mapper: Mapper, raw: RawRow, result: DatasetResult) -> None:
    if raw.error is not None:
        problems = [{"pointer": "", "message": raw.error}]
    elif not isinstance(raw.data, dict):
        problems = [{"pointer": "", "message": f"a row must be a JSON object, got {type(raw.data).__name__}"}]
    else:
        view = mapper.view(raw.data)
        found = check_view(mapper, view)
        if not found:
            row = mapper.canonical(view)
            row["_source"] = f"{raw.file}:{raw.index}"
            result.rows.append(row)
            return
        problems = [problem_record(mapper, raw.data, p) for p in found]
    record = {"file": raw.file, "row": raw.index, **({"line": raw.line} if raw.line is not None else {}),
              **problems[0]}
    if len(problems) > 1:
        record["other_errors"] = problems[1:]
    result.invalid.append(record)
    kept = {"data": raw.data} if raw.error is None else {"raw_text": raw.raw_text}
    result.rejected.append({"dataset": result.entry.name, **record, **kept})


def check_columns(mapper: Mapper, raw_rows: list[RawRow], shown: str) -> None:
    """A column the kind needs (or the entry names) that no row has is one error, not one per row."""
    keys: set = set()
    for raw in raw_rows[:1000]:
        if isinstance(raw.data, dict):
            keys.update(raw.data)
    if not keys:
        return
    entry = mapper.entry
    wanted = [c for c in mapper.required if c in entry.columns]
    wanted += [c for c in sorted(entry.user_columns) if c not in wanted and c in _used_columns(mapper)]
    for logical in wanted:
        column = entry.columns[logical]
        if column in keys or any(isinstance(r.data, dict) and column in r.data for r in raw_rows):
            continue
        raise TunepipeError(
            f"dataset {entry.name!r}: {shown}: column {column!r} ({logical}) is missing from every row; "
            f"columns found: {', '.join(sorted(map(str, keys)))}",
            hint=f"map it in dataset_info.json: \"columns\": {{\"{logical}\": \"<column name>\"}}")


def _used_columns(mapper: Mapper) -> set[str]:
    if mapper.kind == "pretrain":
        return {"messages"} if mapper.chat else {"prompt", "query"}
    return {"messages", *(logical for logical, _ in mapper.top)} if mapper.chat else {l for l, _ in mapper.top}


def build_report(cfg: Config, splits: dict, results: dict[str, DatasetResult], dataset_dir: Path) -> dict:
    return {"stage": cfg.train.stage, "on_invalid": cfg.data.on_invalid,
            "train": splits["train"], "eval": splits["eval"],
            "rows_read": sum(r.rows_read for r in results.values()),
            "valid": sum(len(r.rows) for r in results.values()),
            "invalid": sum(len(r.invalid) for r in results.values()),
            "datasets": {name: r.summary(dataset_dir) for name, r in results.items()}}


def error_summary(bad: dict[str, DatasetResult], layout: Layout) -> str:
    total = sum(len(r.invalid) for r in bad.values())
    lines = [f"{total} invalid row{'s' if total != 1 else ''} in {', '.join(bad)} (data.on_invalid: error)"]
    shown = [rec for r in bad.values() for rec in r.invalid][:ERRORS_SHOWN]
    for rec in shown:
        where = f"{rec['file']}:row {rec['row']}" + (f" (line {rec['line']})" if "line" in rec else "")
        lines.append(f"  {where}: {rec['pointer'] or '/'}: {rec['message']}")
    if total > len(shown):
        lines.append(f"  ... and {total - len(shown)} more")
    return "\n".join(lines)


def write_rejected(path: Path, results: dict[str, DatasetResult]) -> None:
    lines = [json.dumps(rec, ensure_ascii=False) for r in results.values() for rec in r.rejected]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _relative_files(entry: DatasetEntry, dataset_dir: Path) -> list[str]:
    root = dataset_dir.resolve()
    return [str(f.resolve().relative_to(root)) for f in entry.files]
