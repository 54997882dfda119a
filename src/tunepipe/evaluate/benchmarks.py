"""Standard benchmarks, tuned vs base, through EleutherAI's lm-evaluation-harness (`lm_eval`).

`eval.tasks` names harness tasks or groups (`mmlu`, `arc_easy`) or task YAMLs kept in the repo;
LLaMA-Factory's `eval.task` (`mmlu_test`, ...) adds the harness task that runs the same
benchmark. Everything the harness can refuse is found first: every task is built (its data
downloaded from the Hub or read from a local file) before any model is loaded, so an unknown
name or unreachable data costs seconds, not a model load. Then the tuned model (base + adapter as
a PEFT model, never merged on disk; or the full fine-tune) and the base, one at a time, are
wrapped in the harness's `HFLM` and scored on the same built tasks with the harness's fixed seeds.

The report (`metrics/benchmarks.json`, written by `benchmark_outputs`) holds
`benchmarks.<task>.<metric>` = {tuned, base, diff, stderr, base_stderr} for every group and every
task outside a group (mmlu: the overall score and its four categories, as LLaMA-Factory reports).
"""

from __future__ import annotations

import difflib
import gc
import logging
import math
from collections.abc import Callable
from pathlib import Path

from tunepipe.config import LF_BENCHMARKS, Config, EvalConfig
from tunepipe.errors import TunepipeError
from tunepipe.evaluate.outputs import flat_metrics
from tunepipe.io_utils import write_json_atomic
from tunepipe.layout import Layout
from tunepipe.models.trained import (
    base_dir_for,
    device_for,
    load_base,
    load_trained,
    tokenizer_for,
    trained_source,
)
from tunepipe.tracking.tracker import join_train_run

log = logging.getLogger(__name__)

# The harness's own defaults (lm_eval.evaluator.simple_evaluate), named here so the figures match
# published ones and a rerun gives the same bytes.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
# Mean metrics (acc) get an exact stderr; bootstrapped ones (some generation metrics) this many draws.
BOOTSTRAP_ITERS = 1000
BENCHMARKS = "benchmarks.json"


def task_specs(eval_cfg: EvalConfig, quiet: bool = False) -> list[str]:
    """`eval.tasks` plus the harness task LLaMA-Factory's `eval.task` maps to, without repeats."""
    specs = list(eval_cfg.tasks)
    if eval_cfg.task is not None:
        harness = LF_BENCHMARKS[eval_cfg.task]
        if not quiet:
            log.info("eval.task %s (LLaMA-Factory) runs the lm-evaluation-harness task %s, %d-shot%s",
                     eval_cfg.task, harness, fewshot(eval_cfg), _lang_note(eval_cfg.lang, harness))
        if harness not in specs:
            specs.append(harness)
    return specs


def fewshot(eval_cfg: EvalConfig) -> int | None:
    """`num_fewshot`, else LLaMA-Factory's `n_shot` when its `task` is set, else the tasks' own."""
    if eval_cfg.num_fewshot is not None:
        return eval_cfg.num_fewshot
    return eval_cfg.n_shot if eval_cfg.task is not None else None


def _lang_note(lang: str, harness: str) -> str:
    prompt_lang = "en" if harness == "mmlu" else "zh"
    if lang == prompt_lang:
        return ""
    return f" (lang {lang} asked: the harness's {harness} prompts are in {'English' if prompt_lang == 'en' else 'Chinese'})"


def task_manager(eval_cfg: EvalConfig):
    """The harness's task registry, with `task_dir`'s YAMLs and the folders of YAMLs named in `tasks`."""
    from lm_eval.tasks import TaskManager

    include = []
    if eval_cfg.task_dir is not None:
        folder = Path(eval_cfg.task_dir)
        if not folder.is_dir() or not any(folder.rglob("*.yaml")):
            raise TunepipeError(f"eval.task_dir={eval_cfg.task_dir!r}: no folder of lm-evaluation-harness task YAMLs",
                                hint="LLaMA-Factory's evaluation/ folder of dataset scripts is not read: the "
                                     "benchmark data comes from the Hub; unset task_dir")
        include.append(str(folder))
    # Indexing the harness's own few thousand task YAMLs takes seconds: skipped when every task
    # is a YAML of the user's (and no LLaMA-Factory task is asked for).
    names = [spec for spec in task_specs(eval_cfg, quiet=True) if not spec.endswith((".yaml", ".yml"))]
    return TaskManager(include_path=include or None, include_defaults=bool(names))


def load_tasks(specs: list[str], manager) -> dict:
    """Build every task (downloading its data) or fail naming the one that cannot be built.

    One `load` per spec so the error names it; the results are merged into the one dict
    `lm_eval.evaluator.evaluate` takes (tasks / groups / group_map, keyed by name)."""
    merged: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for spec in specs:
        _check_spec(spec, manager)
        try:
            loaded = manager.load([spec])
        except Exception as exc:  # noqa: BLE001 (datasets raises many types for unreachable data)
            raise TunepipeError(f"eval.tasks: {spec}: its data could not be loaded: {type(exc).__name__}: {exc}",
                                hint="check HF_ENDPOINT / HF_HUB_OFFLINE and the task's dataset_path; "
                                     "a local file is named in the task YAML's dataset_kwargs") from None
        for key, into in merged.items():
            into.update(loaded.get(key) or {})
    return merged


def _check_spec(spec: str, manager) -> None:
    if spec.endswith((".yaml", ".yml")):
        if not Path(spec).is_file():
            raise TunepipeError(f"eval.tasks: {spec}: no such task YAML",
                                hint="paths are relative to the directory the command runs in (the repo root)")
        return
    if spec not in manager.all_tasks:
        close = difflib.get_close_matches(spec, manager.all_tasks, n=3, cutoff=0.6)
        raise TunepipeError(f"eval.tasks: {spec!r} is not an lm-evaluation-harness task, group or tag",
                            hint=(f"did you mean {', '.join(close)}? " if close else "")
                            + "`lm-eval ls tasks` lists them; a task of your own is a path to its YAML")


def run_tasks(model, tokenizer, loaded: dict, eval_cfg: EvalConfig, name: str) -> dict:
    """The harness's results for one model: `results` (per task and group) and `n-samples`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    log.info("benchmarking the %s model", name)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_cfg.batch_size)
    # The built tasks go in as objects: TaskManager.load passes them through unbuilt-on, so the
    # data is read once for both models. bootstrap / seeds fixed; no sample log is kept.
    roots = list(_roots(loaded))
    results = simple_evaluate(model=lm, tasks=roots, num_fewshot=fewshot(eval_cfg), limit=eval_cfg.limit,
                              bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, **SEEDS)
    return {"results": results["results"], "n-samples": results.get("n-samples", {})}


def _roots(loaded: dict):
    """The top-level groups and tasks (what was asked for), children reached through them."""
    children = {child for names in loaded["group_map"].values() for child in names}
    for group_name, group in loaded["groups"].items():
        if group_name not in children:
            yield group
    for task_name, task in loaded["tasks"].items():
        if task_name not in children:
            yield task


def reported_names(loaded: dict) -> list[str]:
    """Every group, and every task that is in no group, sorted."""
    children = {child for names in loaded["group_map"].values() for child in names}
    return sorted(set(loaded["groups"]) | {name for name in loaded["tasks"] if name not in children})


def scores(results: dict, names: list[str]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """task -> metric -> (value, stderr) from the harness's `"acc,none"` / `"acc_stderr,none"` keys."""
    table: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task in names:
        row = results.get(task, {})
        for key, value in row.items():
            if "," not in key or "_stderr," in key or not _is_number(value):
                continue
            metric, _, filt = key.partition(",")
            stderr = row.get(f"{metric}_stderr,{filt}")
            label = metric if filt == "none" else f"{metric}_{filt}"
            table.setdefault(task, {})[label] = (float(value), float(stderr) if _is_number(stderr) else None)
    return table


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def benchmark_rows(tuned: dict | None, base: dict | None) -> dict:
    """{task: {metric: {tuned, base, diff, stderr, base_stderr}}} (columns present for the models run)."""
    rows: dict = {}
    for column, table in (("tuned", tuned), ("base", base)):
        for task, metrics in (table or {}).items():
            for metric, (value, stderr) in metrics.items():
                cell = rows.setdefault(task, {}).setdefault(metric, {})
                cell[column] = round(value, 6)
                cell["stderr" if column == "tuned" else "base_stderr"] = None if stderr is None else round(stderr, 6)
    for metrics in rows.values():
        for cell in metrics.values():
            if "tuned" in cell and "base" in cell:
                cell["diff"] = round(cell["tuned"] - cell["base"], 6)
    return rows


def score_one(load: Callable[[], object], tokenizer, loaded: dict, eval_cfg: EvalConfig, name: str) -> dict:
    model = load()
    try:
        out = run_tasks(model, tokenizer, loaded, eval_cfg, name)
    finally:
        del model
        gc.collect()
    return out


def documents(loaded: dict, n_samples: dict, names: list[str]) -> dict[str, int]:
    """Documents scored per reported name (a group: the sum over its tasks)."""
    def count(task_name: str) -> int:
        return int(n_samples.get(task_name, {}).get("effective", 0))

    out = {}
    for name in names:
        group = loaded["groups"].get(name)
        out[name] = sum(count(t.task_name) for t in group.get_all_tasks()) if group is not None else count(name)
    return out


def prepare_benchmarks(cfg: Config) -> dict | None:
    """The built tasks of `eval.tasks` / `eval.task` (None when there are none): run this before
    loading any model, so a bad name or unreachable data fails fast."""
    specs = task_specs(cfg.eval)
    return load_tasks(specs, task_manager(cfg.eval)) if specs else None


def run_benchmarks(cfg: Config, layout: Layout, loaded: dict | None = None) -> dict:
    """Benchmark tuned and base on `eval.tasks` / `eval.task`; write metrics/benchmarks.json; return it.

    `loaded`: what `prepare_benchmarks` returned, when the caller checked the tasks earlier."""
    loaded = loaded if loaded is not None else prepare_benchmarks(cfg)
    if loaded is None:
        report: dict = {"benchmarks": {}}
        write_benchmarks(cfg, layout, report, None)
        return report
    names = reported_names(loaded)
    source = trained_source(cfg, layout)
    base_dir = base_dir_for(cfg, layout)
    tokenizer = tokenizer_for(cfg, base_dir, source)
    device = device_for()
    tuned = base = None
    if source.kind != "none":
        tuned = score_one(lambda: load_trained(cfg, base_dir, source, device), tokenizer, loaded, cfg.eval, "tuned")
    else:
        log.info("no trained model under %s: benchmarking the base model alone", layout.root)
    if cfg.eval.compare_base or tuned is None:
        base = score_one(lambda: load_base(cfg, base_dir, device, quantized=True), tokenizer, loaded, cfg.eval,
                         "base")
    first = tuned or base
    report = {"benchmarks": benchmark_rows(tuned and scores(tuned["results"], names),
                                           base and scores(base["results"], names)),
              "documents": documents(loaded, first["n-samples"], names)}
    write_benchmarks(cfg, layout, report, source)
    return report


def write_benchmarks(cfg: Config, layout: Layout, report: dict, source) -> None:
    """metrics/benchmarks.json (and SAVE_DIR/results.json), atomically; the figures into MLflow."""
    write_json_atomic(layout.metrics / BENCHMARKS, report)
    if cfg.eval.save_dir is not None:
        write_json_atomic(Path(cfg.eval.save_dir) / "results.json", report)
    if source is not None and report["benchmarks"]:
        tracker = join_train_run(cfg, source.record_dir)
        if tracker is not None:
            tracker.log_metrics({key: value for key, value in flat_metrics(report["benchmarks"], "bench").items()
                                 if "stderr" not in key})


def print_benchmarks(report: dict) -> None:
    """One line per task and metric: tuned / base / diff (what `tunepipe eval` and the stage show)."""
    if not report.get("benchmarks"):
        return
    print(f"{'benchmark':<32} {'tuned':>10} {'base':>10} {'diff':>10} {'stderr':>10}")
    for task, metrics in report["benchmarks"].items():
        for metric, cell in metrics.items():
            cells = [f"{cell[k]:>10.4f}" if cell.get(k) is not None else f"{'':>10}"
                     for k in ("tuned", "base", "diff", "stderr")]
            print(f"{task + ' ' + metric:<32} {' '.join(cells)}")
