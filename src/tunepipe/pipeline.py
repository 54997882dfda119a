"""The pipeline as plain function calls: what `tunepipe train cfg.yaml` runs without DVC.

Each step is the same library function a DVC stage script calls; the CLI only
chooses the root (`train.output_dir`) instead of the repository root.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from tunepipe.config import Config
from tunepipe.config_loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.modeling import ensure_base_model

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
    cfg, layout = cli_config(args)
    ensure_base_model(cfg.model, layout.base_model)
    step("tokenize")(cfg, layout)
    return 0


def train_command(args) -> int:
    """validate -> tokenize -> train, all under train.output_dir."""
    cfg, layout = cli_config(args)
    run_train_pipeline(cfg, layout)
    return 0


def run_train_pipeline(cfg: Config, layout: Layout) -> None:
    log.info("writing under %s", layout.root)
    ensure_base_model(cfg.model, layout.base_model)
    for name in ("validate", "tokenize", "train"):
        log.info("== %s ==", name)
        step(name)(cfg, layout)
