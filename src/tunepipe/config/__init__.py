"""Configuration: every key a user can set, and how LLaMA-Factory's keys map onto them.

One place for a key's whole story:
- `groups` (model, data, eval, export, tracking) and `training` (the train group): typed
  dataclasses, one field per key with its one-line docstring, range checks beside the fields;
- `checks`: defaults, secret keys and the small value checks every group shares;
- `loader`: reads params.yaml / a LLaMA-Factory YAML / `key=value` overrides into a `Config`,
  strictly (unknown keys, wrong types and refused LLaMA-Factory keys fail with a hint);
- `lf_keys`: LLaMA-Factory keys tunepipe maps, ignores or refuses, each with its reason;
- `docgen`: regenerates the README's key reference and the migration guide's key table
  (`python -m tunepipe.config.docgen`).

The names below are re-exported so `from tunepipe.config import Config` reads as it did
when this package was one module.
"""

from tunepipe.config.checks import DEFAULT_MODEL, DEFAULT_TEMPLATE_DATE, SECRET_KEYS, shown_value
from tunepipe.config.groups import (
    GROUPS,
    LF_BENCHMARKS,
    Config,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    TrackingConfig,
)
from tunepipe.config.training import TrainConfig

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_TEMPLATE_DATE", "GROUPS", "LF_BENCHMARKS", "SECRET_KEYS", "Config", "DataConfig",
    "EvalConfig", "ExportConfig", "ModelConfig", "TrackingConfig", "TrainConfig", "shown_value",
]
