"""The summary `make demo` prints after `dvc repro`: what ran and where its outputs are."""

from __future__ import annotations

import json
from pathlib import Path

OUTPUTS = [
    ("base model", "models/base"),
    ("validation report", "reports/validation.json"),
    ("tokenized shards", "data/tokenized"),
    ("adapter", "models/adapter"),
    ("full model", "models/full"),
    ("eval metrics", "metrics/eval.json"),
    ("merged model", "models/export"),
]


def main(root: str = ".") -> int:
    root_path = Path(root)
    print("\ntunepipe demo: pipeline outputs")
    for label, rel in OUTPUTS:
        path = root_path / rel
        print(f"  {label:<18} {rel:<26} {'ok' if path.exists() else '(stage not built yet)'}")
    eval_path = root_path / "metrics" / "eval.json"
    if eval_path.is_file():
        print(json.dumps(json.loads(eval_path.read_text()), indent=2))
    print("\nlook at the runs: mlflow ui --backend-store-uri sqlite:///mlflow.db")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
