"""What `make demo` prints after `dvc repro`: where the model is, whether tuning helped, where to look.

Reads only the pipeline's outputs (JSON files, no torch), so it runs in a blink and
also works on a pipeline someone else ran: the merged model and its size, the eval
table (tuned, base and the difference for every metric in `metrics/eval.json`), a few
answers of both models, and the command that opens the MLflow run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tunepipe.config import Config
from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError, stage_main
from tunepipe.layout import Layout

DEFAULT_STORE = "sqlite:///mlflow.db"
ROLE_WORDS = {"system", "user", "assistant", "tool", "ipython"}
SHOWN_ANSWERS = 3


def main(root: str = ".") -> None:
    layout = Layout.at(root)
    cfg = load_config(Path(root) / "params.yaml")
    print()
    print(model_lines(cfg, layout))
    report = read_json(layout.metrics / "eval.json")
    if report is None:
        print("no metrics/eval.json yet: the evaluate stage has not run")
    else:
        print(eval_table(report))
        print(answers(layout.reports / "predictions.jsonl"))
    print(tracking_lines(cfg, layout))


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunepipeError(f"{path}: not valid JSON ({exc})") from None


def model_lines(cfg: Config, layout: Layout) -> str:
    export_dir = layout.root / cfg.export.export_dir
    trained = layout.trained(cfg.train.finetuning_type)
    lines = ["tunepipe demo: fine-tuned, evaluated and merged"]
    if export_dir.is_dir():
        shards = sorted(export_dir.glob("*.safetensors"))
        size_mb = sum(p.stat().st_size for p in shards) / 1e6
        lines.append(f"  merged model   {export_dir}/  ({len(shards)} safetensors shard(s), {size_mb:.0f} MB)")
        lines.append(f"                 chat with it: tunepipe chat params.yaml model_name_or_path={export_dir}")
    else:
        lines.append(f"  merged model   {export_dir}/ missing: the merge stage has not run")
    lines.append(f"  trained        {trained}/")
    return "\n".join(lines)


def eval_table(report: dict) -> str:
    """tuned / base / diff per metric; identity_accuracy first, the demo's headline."""
    tuned, base, diff = report.get("tuned", {}), report.get("base", {}), report.get("diff", {})
    # counts such as eval_tokens are the same for both models and have no diff: not metrics
    keys = [key for key in tuned if not diff or key in diff]
    keys.sort(key=lambda key: (key != "identity_accuracy", list(tuned).index(key)))
    lines = [f"\neval on {report.get('eval_rows', '?')} held-out rows (metrics/eval.json):",
             f"  {'metric':<20} {'tuned':>10} {'base':>10} {'diff':>10}"]
    for key in keys:
        cells = [_number(col.get(key)) for col in (tuned, base, diff)]
        lines.append(f"  {key:<20} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10}")
    for section in ("preference", "reward"):
        for key, value in (report.get(section) or {}).items():
            lines.append(f"  {section + '/' + key:<20} {_number(value):>10}")
    if "identity_accuracy" in diff:
        verdict = "beats" if diff["identity_accuracy"] > 0 else "does NOT beat"
        lines.append(f"  -> the tuned model {verdict} the base on identity questions")
    return "\n".join(lines)


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    return f"{value:.4f}"


def answers(path: Path, count: int = SHOWN_ANSWERS) -> str:
    """The first few eval answers of both models: the fine-tune's effect in plain words."""
    if not path.is_file():
        return ""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [f"\nanswers ({path}):"]
    for row in rows[:count]:
        lines.append(f"  Q: {_one_line(question(row.get('prompt', '')))}")
        lines.append(f"     tuned: {_one_line(row.get('predict', ''))}")
        if "base_predict" in row:
            lines.append(f"     base:  {_one_line(row['base_predict'])}")
    return "\n".join(lines)


def question(prompt: str) -> str:
    """The last user turn of a rendered chat prompt: the text between the template's
    special tokens (`<|...|>`), minus the role names the template writes beside them."""
    pieces = [line.strip() for line in re.sub(r"<\|[^|<>]*\|>", "\n", prompt).splitlines()]
    content = [line for line in pieces if line and line not in ROLE_WORDS]
    return content[-1] if content else prompt


def _one_line(text: str, limit: int = 100) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def tracking_lines(cfg: Config, layout: Layout) -> str:
    record = read_json(layout.trained(cfg.train.finetuning_type) / "tunepipe_run.json") or {}
    uri = record.get("tracking_uri") or cfg.tracking.tracking_uri or DEFAULT_STORE
    run = f" (run {record['mlflow_run_id']})" if record.get("mlflow_run_id") else ""
    lines = [f"\nMLflow{run}, experiment {cfg.tracking.experiment_name!r}:"]
    if uri.startswith(("http://", "https://")):
        lines.append(f"  open {uri}")
    else:
        lines.append(f"  mlflow ui --backend-store-uri {uri}    # then open http://127.0.0.1:5000")
    lines.append("compare experiments: dvc exp show; loss curve: dvc plots show")
    return "\n".join(lines)


if __name__ == "__main__":
    stage_main(lambda: main(sys.argv[1] if len(sys.argv) > 1 else "."))
