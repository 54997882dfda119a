"""Parity: tunepipe's `data.template: NAME` against LLaMA-Factory 0.9.5's template of that name.

For every supported template and every LLaMA-Factory demo set (alpaca_en_demo, identity,
glaive_toolcall_en_demo as SFT; dpo_en_demo as pairs; kto_en_demo as KTO; c4_demo as
pretraining, where the template decides the EOS), both sides tokenize the same files
with the same SmolLM2-135M-Instruct tokenizer and cutoff; each row's token ids and labels
are compared. Prints rows equal / rows compared per template and dataset.

    .venv/bin/python bench/template_parity.py [--templates qwen llama3] [--cutoff-len 1024]
        [--write-fixtures] [--base DIR] [--work DIR] [--reuse] [--set mask_history=true] [--today 2024-07-26]

Both sides render the same date (llama3's tool prompt): tunepipe's `data.template_date`, and
LLaMA-Factory, which reads the clock, with its clock held on that day (time-machine).

`--multimodal` compares the vision templates instead (qwen2_vl, qwen3_vl, qwen3_vl_nothink, llava,
llava_next, gemma3) on mllm_demo (images): each with a tiny random model of its family built here
(tests/fixtures/tiny_vlm*.py: the test tokenizer with the family's media tokens and the family's
image processor, saved as a processor LLaMA-Factory's AutoProcessor loads), both sides under the
same image_max_pixels; every row's ids and labels. With `--write-fixtures` it writes
tests/fixtures/template_parity/multimodal/<template>.json (all rows), which
tests/test_template_parity.py checks against tunepipe alone.

`--write-fixtures` also writes tests/fixtures/template_parity/<template>.json: a few
rows per dataset (the canonical row tunepipe reads and LLaMA-Factory's ids and labels),
which tests/test_template_parity.py checks on every `make test` without LLaMA-Factory.
Needs `bash bench/setup_llamafactory.sh` (LF_VENV selects another LLaMA-Factory venv).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
from pathlib import Path

from _common import (
    DEFAULT_WORK,
    LF_DEMO,
    LF_DRIVER,
    LF_PYTHON,
    REPO,
    base_model_dir,
    machine_summary,
    print_machine,
    require_ok,
    run_measured,
)

# (dataset, LLaMA-Factory stage, tunepipe train.stage, the columns compared)
DATASETS = [
    ("alpaca_en_demo", "sft", "sft", ("input_ids", "labels")),
    ("identity", "sft", "sft", ("input_ids", "labels")),
    ("glaive_toolcall_en_demo", "sft", "sft", ("input_ids", "labels")),
    ("dpo_en_demo", "rm", "rm", ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")),
    ("kto_en_demo", "kto", "kto", ("input_ids", "labels")),
    ("c4_demo", "pt", "pt", ("input_ids",)),
]
# LLaMA-Factory 0.9.5's gemma3 needs the model's multimodal processor even for text-only rows, so it
# cannot run on SmolLM2's tokenizer; its text slots, EOS and stop words are gemma's, so gemma3 is
# compared against LLaMA-Factory's gemma rows (docs/migrating-from-llama-factory.md).
STAND_INS = {"gemma3": "gemma"}
FIXTURES = REPO / "tests" / "fixtures" / "template_parity"
# multimodal mode: template -> the tiny model family it runs on (tests/fixtures/tiny_vlm_families.py BUILDERS;
# qwen2_vl: tests/fixtures/tiny_vlm.py)
VISION_MODELS = {"qwen2_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_nothink": "qwen3_vl",
                 "qwen3_5": "qwen3_5_moe", "qwen3_5_nothink": "qwen3_5_moe", "llava": "llava",
                 "llava_next": "llava_next", "gemma3": "gemma3", "paligemma": "paligemma"}
MM_DATASETS = [("mllm_demo", "sft", "sft", ("input_ids", "labels"))]
MM_PIXELS = {"image_max_pixels": 112 * 112, "image_min_pixels": 32 * 32}  # a few dozen tokens an image


def vision_model_dirs(work: Path) -> dict[str, Path]:
    """family -> a tiny random model dir of that family, built once under `work`."""
    sys.path.insert(0, str(REPO))
    from tests.fixtures.tiny_vlm import build_tiny_qwen2vl_dir
    from tests.fixtures.tiny_vlm_families import BUILDERS

    builders = {**BUILDERS, "qwen2_vl": build_tiny_qwen2vl_dir}
    dirs = {}
    for family in sorted(set(VISION_MODELS.values())):
        dirs[family] = work / "vlm-models" / family
        if not (dirs[family] / "config.json").is_file():
            builders[family](dirs[family])
    return dirs


def multimodal(args) -> int:
    """The vision templates on mllm_demo: each template's rows from both sides, every row compared."""
    templates = [t for t in args.templates if t in VISION_MODELS] or sorted(VISION_MODELS)
    dirs = vision_model_dirs(args.work)
    models = {t: str(dirs[VISION_MODELS[t]]) for t in templates}
    (args.work / "multimodal").mkdir(parents=True, exist_ok=True)
    lf = lf_rows(templates, MM_DATASETS, dirs["qwen2_vl"], args.cutoff_len, args.work / "multimodal", args.reuse,
                 {**MM_PIXELS, "models": models}, args.today)
    print(f"{'template':<17} {'dataset':<12} rows equal / compared")
    for template in templates:
        dataset, _, stage, names = MM_DATASETS[0]
        tp, rows = tunepipe_rows(template, dataset, stage, dirs[VISION_MODELS[template]], args.cutoff_len,
                                 args.work / "multimodal" / template, MM_PIXELS, args.today)
        theirs = lf[(template, dataset)]
        if "error" in theirs:
            print(f"{template:<17} {dataset:<12} LLaMA-Factory failed: {theirs['error']}", flush=True)
            continue
        equal, compared, differ = compare(theirs, tp, names)
        count = f"  (row counts: tunepipe {len(tp[names[0]])}, LLaMA-Factory {len(theirs[names[0]])})" \
            if len(tp[names[0]]) != len(theirs[names[0]]) else ""
        note = f"  first difference: row {differ[0]}" if differ else ""
        print(f"{template:<17} {dataset:<12} {equal} / {compared}{note}{count}", flush=True)
        if args.write_fixtures and not differ and not count:
            fixture = {"template": template, "model": VISION_MODELS[template], "cutoff_len": args.cutoff_len,
                       "template_date": args.today, **MM_PIXELS,
                       "datasets": {dataset: {"stage": stage, "rows": [
                           {"row": {k: v for k, v in row.items() if k != "_source"},
                            "expected": {n: list(theirs[n][i]) for n in names}} for i, row in enumerate(rows)]}}}
            (FIXTURES / "multimodal").mkdir(parents=True, exist_ok=True)
            (FIXTURES / "multimodal" / f"{template}.json").write_text(
                json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return 0


def lf_rows(templates: list[str], datasets: list, base: Path, cutoff_len: int, work: Path, reuse: bool,
            extra: dict, today: str) -> dict:
    """{(template, dataset): columns} from one LLaMA-Factory process."""
    out = work / "lf-rows.jsonl"
    args = {"model_name_or_path": str(base), "do_train": True, "finetuning_type": "lora",
            "dataset_dir": str(LF_DEMO), "cutoff_len": cutoff_len, "overwrite_cache": True,
            "output_dir": str(work / "lf-out"), "report_to": "none", "use_cpu": True,
            "templates": templates, "datasets": [[name, stage] for name, stage, _, _ in datasets],
            "rows_out": str(out), "today": today, **extra}
    config = work / "lf-args.json"
    if reuse and out.is_file() and config.is_file() and json.loads(config.read_text()) == args:
        print(f"[bench] reusing LLaMA-Factory's rows from {out}", flush=True)
        return read_rows(out)
    config.write_text(json.dumps(args))
    measured = run_measured([str(LF_PYTHON), "-P", str(LF_DRIVER), "rows", str(config)], work / "lf.log",
                            env={"HF_DATASETS_CACHE": str(work / "hf-cache")})
    require_ok("LLaMA-Factory", measured)
    return read_rows(out)


def read_rows(out: Path) -> dict:
    table = {}
    with open(out, encoding="utf-8") as lines:
        for line in lines:
            item = json.loads(line)
            table[(item["template"], item["dataset"])] = item.get("columns") or {"error": item["error"]}
    return table


def tunepipe_rows(template: str, dataset: str, stage: str, base: Path, cutoff_len: int, work: Path,
                  extra: dict, today: str):
    """(columns of the train shard, the canonical rows it came from) from tunepipe's validate + tokenize."""
    from datasets import load_from_disk

    from tunepipe.config.loader import load_config
    from tunepipe.data.checks.validated import read_manifest, read_validated
    from tunepipe.data.tokenize import run_tokenize
    from tunepipe.data.validate import run_validate
    from tunepipe.layout import Layout

    root = work / "tunepipe" / f"{dataset}-{stage}"
    (root / "models").mkdir(parents=True, exist_ok=True)
    if not (root / "models" / "base").exists():
        (root / "models" / "base").symlink_to(base)
    cfg = load_config(None, [f"data.dataset={dataset}", f"data.dataset_dir={LF_DEMO}", f"train.stage={stage}",
                             "data.val_size=0", f"data.cutoff_len={cutoff_len}", f"data.template={template}", f"data.template_date={today}",
                             *[f"data.{key}={value}" for key, value in extra.items()]])
    layout = Layout.at(root)
    if not (layout.validated / "manifest.json").is_file():
        run_validate(cfg, layout)
    run_tokenize(cfg, layout)
    shard = load_from_disk(str(layout.tokenized / "train"))
    rows = [row for item in read_manifest(layout.validated)["train"] for row in read_validated(layout.validated, item)]
    return {name: shard[name] for name in shard.column_names}, rows


def compare(lf: dict, tp: dict, names: tuple) -> tuple[int, int, list[int]]:
    """(rows equal, rows compared, indices of the rows that differ). Rows pair up in order; a
    count mismatch is reported by the caller."""
    count = min(len(lf[names[0]]), len(tp[names[0]]))
    differ = [i for i in range(count) if any(list(lf[n][i]) != list(tp[n][i]) for n in names)]
    return count - len(differ), count, differ


def fixture_rows(lf: dict, rows: list[dict], names: tuple, differ: list[int]) -> list[dict]:
    """The shortest equal row, and for tool data the shortest equal row with a tool call (small files)."""
    if len(rows) != len(lf[names[0]]):
        return []  # rows cannot be paired with LLaMA-Factory's
    ok = [i for i in range(len(rows)) if i not in set(differ)]
    tools = [i for i in ok if rows[i].get("tools") and any(m["role"] == "function_call" for m in rows[i]["messages"])]
    picks = [min(group, key=lambda i: len(lf[names[0]][i])) for group in (ok, tools) if group]
    return [{"row": {k: v for k, v in rows[i].items() if k != "_source"},
             "expected": {n: list(lf[n][i]) for n in names}} for i in dict.fromkeys(picks)]


def main() -> int:
    from tunepipe.config import DEFAULT_TEMPLATE_DATE
    from tunepipe.data.chat.named_templates import TEMPLATES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", nargs="*", default=sorted(TEMPLATES))
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--base", type=Path, default=None, help="an HF SmolLM2 dir (default: converted once)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK / "template_parity")
    parser.add_argument("--write-fixtures", action="store_true")
    parser.add_argument("--datasets", nargs="*", default=[d[0] for d in DATASETS])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a data key for both sides, e.g. mask_history=true")
    parser.add_argument("--today", default=DEFAULT_TEMPLATE_DATE,
                        help="the date both sides render (LLaMA-Factory's clock is held there); "
                             "default: tunepipe's data.template_date default")
    parser.add_argument("--reuse", action="store_true", help="reuse LLaMA-Factory's rows from a run with the same args")
    parser.add_argument("--multimodal", action="store_true",
                        help="the vision templates on mllm_demo, each on a tiny model of its family")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    print_machine(machine_summary())
    args.work.mkdir(parents=True, exist_ok=True)
    if args.multimodal:
        return multimodal(args)
    base = args.base or base_model_dir(DEFAULT_WORK)
    lf_names = list(dict.fromkeys(args.templates + [STAND_INS[t] for t in args.templates if t in STAND_INS]))
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    datasets = [d for d in DATASETS if d[0] in args.datasets]
    lf = lf_rows(lf_names, datasets, base, args.cutoff_len, args.work, args.reuse, extra, args.today)
    print(f"{'template':<15} {'dataset':<25} rows equal / compared")
    totals = {}
    for template in args.templates:
        fixture = {"template": template, "cutoff_len": args.cutoff_len, "template_date": args.today, "datasets": {}}
        for dataset, _, stage, names in datasets:
            tp, rows = tunepipe_rows(template, dataset, stage, base, args.cutoff_len, args.work, extra, args.today)
            theirs = lf[(template, dataset)]
            if "error" in theirs and template in STAND_INS:
                theirs = lf[(STAND_INS[template], dataset)]
            if "error" in theirs:
                print(f"{template:<15} {dataset:<25} LLaMA-Factory failed: {theirs['error']}", flush=True)
                continue
            equal, compared, differ = compare(theirs, tp, names)
            totals[template] = [a + b for a, b in zip(totals.get(template, [0, 0]), (equal, compared))]
            note = f"  first difference: row {differ[0]}" if differ else ""
            surplus = len(tp[names[0]]) - len(theirs[names[0]])
            if surplus == 1 and stage == "pt":
                note += "  (+1 final short block: tunepipe keeps it, LLaMA-Factory drops it)"
            elif surplus:
                note += f"  (row counts differ: tunepipe {len(tp[names[0]])}, LLaMA-Factory {len(theirs[names[0]])})"
            print(f"{template:<15} {dataset:<25} {equal} / {compared}{note}", flush=True)
            if stage != "pt":
                fixture["datasets"][dataset] = {"stage": stage, "rows": fixture_rows(theirs, rows, names, differ)}
        if args.write_fixtures:
            FIXTURES.mkdir(parents=True, exist_ok=True)
            (FIXTURES / f"{template}.json").write_text(json.dumps(fixture, ensure_ascii=False,
                                                                  separators=(",", ":")) + "\n",
                                                       encoding="utf-8")
    print("\ntotal per template: " + ", ".join(f"{t} {e}/{c}" for t, (e, c) in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
