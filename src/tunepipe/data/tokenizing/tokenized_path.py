"""LLaMA-Factory's preprocess-then-train flow (`tokenized_path`) for `tunepipe train`.

When `data.tokenized_path` names a folder that holds tokenized shards, `tunepipe train` uses
them and neither validates nor tokenizes (as LLaMA-Factory loads its saved dataset and ignores
the other data arguments); when the folder is absent, the run tokenizes as usual and saves the
shards there for the next run. The shards are tunepipe's (`data/tokenized/` with meta.json and
the data stats), copied in and out of the run's own `data/tokenized/`, so the train step and
everything after it read the run's folder as always. LLaMA-Factory's own saved datasets (an
Arrow DatasetDict without meta.json) are not read: their columns and masks are its own.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tunepipe.config import Config
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import atomic_dir
from tunepipe.layout import Layout

log = logging.getLogger(__name__)

META = "meta.json"
STATS = "data.json"  # metrics/data.json of the run that tokenized, kept beside the shards


def saved_shards(cfg: Config) -> Path | None:
    """The tokenized_path folder when it holds shards to reuse; None when it is unset or absent."""
    if not cfg.data.tokenized_path:
        return None
    path = Path(cfg.data.tokenized_path)
    if not path.exists():
        return None
    if not (path / META).is_file():
        raise TunepipeError(f"data.tokenized_path={str(path)!r} exists but holds no tunepipe shards ({META} missing)",
                            hint="point it at an empty or new folder (the first run saves the shards there); "
                                 "LLaMA-Factory's own tokenized datasets are not read")
    return path


def use_saved_shards(path: Path, layout: Layout) -> None:
    """Copy the saved shards in as this run's data/tokenized/ (and their data stats)."""
    log.warning("using the tokenized shards in %s: the data keys (dataset, template, cutoff_len, ...) "
                "are not read again (delete that folder to tokenize anew)", path)
    with atomic_dir(layout.tokenized) as tmp:
        shutil.copytree(path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STATS))
    if (path / STATS).is_file():
        layout.metrics.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path / STATS, layout.metrics / STATS)


def save_shards(cfg: Config, layout: Layout) -> None:
    """After tokenizing: save this run's shards (and data stats) to tokenized_path."""
    target = Path(cfg.data.tokenized_path)
    with atomic_dir(target) as tmp:
        shutil.copytree(layout.tokenized, tmp, dirs_exist_ok=True)
        if (layout.metrics / STATS).is_file():
            shutil.copy2(layout.metrics / STATS, tmp / STATS)
    log.info("tokenized shards saved to %s; later runs with tokenized_path: %s reuse them", target, target)
