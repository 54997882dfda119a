"""The pipeline as plain function calls: what `tunepipe train cfg.yaml` runs without DVC.

Each step is the same library function a DVC stage script calls; the CLI only
chooses the root (`train.output_dir`) instead of the repository root. Like
`llamafactory-cli`, each command runs what it needs first: `train` always validates and
tokenizes; `tokenize` validates and `eval` validates and tokenizes when those outputs are
missing under the output_dir or were made for another stage or other datasets. (The DVC
stages stay one step each: there `dvc repro` decides what is stale.) Checks that need no
data (precision on this machine) run before any step.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import replace

from tunepipe.config import Config
from tunepipe.config.loader import load_config
from tunepipe.data.tokenizing.tokenized_path import save_shards, saved_shards, use_saved_shards
from tunepipe.devices import check_precision
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import hold_run_lock, read_json
from tunepipe.layout import Layout
from tunepipe.models.base import ensure_base_model

log = logging.getLogger(__name__)

# step name -> (module, function(cfg, layout)); resolved lazily so a missing stage
# gives a clear "not built yet" error naming it.
STEPS: dict[str, tuple[str, str]] = {
    "validate": ("tunepipe.data.validate", "run_validate"),
    "tokenize": ("tunepipe.data.tokenize", "run_tokenize"),
    "train": ("tunepipe.train", "run_train"),
}


def step(name: str) -> Callable[[Config, Layout], object]:
    module_name, func_name = STEPS[name]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, func_name)
    except (ModuleNotFoundError, AttributeError) as exc:
        missing = getattr(exc, "name", None) or ""
        if isinstance(exc, AttributeError) or missing.startswith("tunepipe"):
            raise TunepipeError(f"the {name} stage is not built yet ({module_name}.{func_name})") from None
        raise


def cli_config(args) -> tuple[Config, Layout]:
    cfg = load_config(args.config, args.overrides)
    return cfg, Layout.at(cfg.train.output_dir)


def base_model_command(args) -> int:
    cfg, layout = cli_config(args)
    ensure_base_model(cfg.model, layout.base_model)
    print(f"base model ready: {layout.base_model}")
    return 0


def validate_command(args) -> int:
    cfg, layout = cli_config(args)
    step("validate")(cfg, layout)
    return 0


def tokenize_command(args) -> int:
    """validate (when missing or made for another config) -> tokenize."""
    cfg, layout = cli_config(args)
    ensure_base_model(cfg.model, layout.base_model)
    if not validated_is_current(cfg, layout):
        step("validate")(cfg, layout)
    step("tokenize")(cfg, layout)
    return 0


def refuse_adapter_to_continue(cfg: Config) -> None:
    """Training starts a new adapter: from the base, or with `create_new_adapter` on top of the
    `adapter_name_or_path` adapters merged into it. Without create_new_adapter LLaMA-Factory
    would continue the last adapter, which tunepipe cannot yet; most often such a config is a
    predict YAML (`do_predict: true`, run by `llamafactory-cli train`) given to the train command."""
    if cfg.model.adapters() and not cfg.train.create_new_adapter:
        raise TunepipeError(
            "model.adapter_name_or_path is set, but `tunepipe train` trains a new adapter "
            "and cannot continue an existing one yet",
            hint="a predict YAML (do_predict: true) runs with `tunepipe eval`, a merge YAML with "
                 "`tunepipe export`; to train a new adapter on top of these, set create_new_adapter: true; "
                 "to train from the base, remove adapter_name_or_path")


def eval_command(args) -> int:
    """validate and tokenize when their outputs are missing, then evaluate, then the benchmarks
    of `eval.tasks` (`tunepipe eval`). With LLaMA-Factory's `eval.task` set it is
    `llamafactory-cli eval`: benchmarks only, of the trained model if there is one, else the base."""
    from tunepipe.evaluate.benchmarks import prepare_benchmarks, print_benchmarks, run_benchmarks
    from tunepipe.evaluate.run import print_report, run_evaluate
    from tunepipe.models.trained import require_trained, trained_source

    cfg, layout = cli_config(args)
    benchmarks_only = cfg.eval.task is not None
    if not benchmarks_only:
        require_trained(trained_source(cfg, layout, quiet=True), cfg, layout)  # before any data work
    loaded = prepare_benchmarks(cfg)  # unknown tasks and unreachable data fail before any model loads
    if not benchmarks_only:
        ensure_eval_data(cfg, layout)
        log.info("== evaluate ==")
        print_report(run_evaluate(cfg, layout), layout)
    if loaded is not None:
        log.info("== benchmark ==")
        print_benchmarks(run_benchmarks(cfg, layout, loaded))
        print(f"wrote {layout.metrics / 'benchmarks.json'}")
    return 0


def ensure_eval_data(cfg: Config, layout: Layout) -> None:
    """Validate and tokenize for evaluation, each when its output is missing or stale.

    With `eval_dataset` set only those datasets are read: the train split (`dataset`,
    default `identity`) plays no part in evaluation, so they stand in for it too. A predict
    YAML then needs no `dataset` entry, and a training run's rows with the same
    `eval_dataset` are reused as they are."""
    eval_only = bool(cfg.data.eval_datasets())
    data_cfg = replace(cfg, data=replace(cfg.data, dataset=cfg.data.eval_dataset)) if eval_only else cfg
    ensure_base_model(cfg.model, layout.base_model)
    validate = not validated_is_current(data_cfg, layout, eval_only)
    if validate:
        log.info("== validate ==")
        step("validate")(data_cfg, layout)
    if validate or not tokenized_is_current(data_cfg, layout):
        log.info("== tokenize ==")
        step("tokenize")(data_cfg, layout)


def validated_is_current(cfg: Config, layout: Layout, eval_only: bool = False) -> bool:
    """data/validated/ holds this stage's rows of exactly the configured datasets (with
    `eval_only`, of the configured eval datasets, whatever the train split)."""
    manifest = _read_or_none(layout.validated / "manifest.json")
    if manifest is None:
        log.info("no validated rows in %s yet: validating first", layout.validated)
        return False
    names = {split: [item["name"] for item in manifest.get(split, [])] for split in ("train", "eval")}
    have = (manifest.get("stage"), None if eval_only else names["train"], names["eval"])
    want = (cfg.train.stage, None if eval_only else cfg.data.datasets(), cfg.data.eval_datasets())
    if have != want:
        log.info("%s was validated for another stage or other datasets: validating again", layout.validated)
        return False
    log.info("using the validated rows in %s (`tunepipe validate` redoes them)", layout.validated)
    return True


def tokenized_is_current(cfg: Config, layout: Layout) -> bool:
    """data/tokenized/ exists, with an eval split, for this stage."""
    meta = _read_or_none(layout.tokenized / "meta.json")
    if meta is None or not (layout.tokenized / "eval").is_dir():
        log.info("no tokenized shards in %s yet: tokenizing first", layout.tokenized)
        return False
    if meta.get("stage") != cfg.train.stage:
        log.info("%s was tokenized for train.stage=%s: tokenizing again", layout.tokenized, meta.get("stage"))
        return False
    log.info("using the tokenized shards in %s (`tunepipe tokenize` redoes them)", layout.tokenized)
    return True


def _read_or_none(path) -> dict | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def train_command(args) -> int:
    """validate -> tokenize -> train, all under train.output_dir (one run at a time there)."""
    cfg, layout = cli_config(args)
    train_preflight(cfg)  # before the run lock creates output_dir
    with hold_run_lock(layout.root, cfg.train.machine_rank):
        run_train_steps(cfg, layout)
    return 0


def train_preflight(cfg: Config) -> None:
    """What can be refused without data: fp16 without a GPU, an adapter training would ignore."""
    check_precision(cfg.train)
    refuse_adapter_to_continue(cfg)


def run_train_pipeline(cfg: Config, layout: Layout) -> None:
    """`tunepipe train` without the CLI's run lock: checks, then validate -> tokenize -> train."""
    train_preflight(cfg)
    run_train_steps(cfg, layout)


def run_train_steps(cfg: Config, layout: Layout) -> None:
    log.info("writing under %s", layout.root)
    if cfg.train.machine_rank > 0:
        # multi-node on shared storage: machine 0 prepares the data; this machine's ranks
        # wait for it when they join the process group (tunepipe.train.parallel.sharding)
        log.info("== train (machine %d of %d: data prepared by machine 0) ==",
                 cfg.train.machine_rank, cfg.train.num_machines)
        step("train")(cfg, layout)
        return
    ensure_base_model(cfg.model, layout.base_model)
    saved = saved_shards(cfg)
    if saved is not None:  # LLaMA-Factory's tokenized_path: reuse, skip validate and tokenize
        use_saved_shards(saved, layout)
    for name in ("train",) if saved is not None else ("validate", "tokenize", "train"):
        log.info("== %s ==", name)
        step(name)(cfg, layout)
        if name == "tokenize" and cfg.data.tokenized_path:
            save_shards(cfg, layout)
