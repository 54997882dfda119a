"""benchmark stage: standard benchmarks (lm-evaluation-harness tasks), tuned vs base.

Reads:   models/base, models/adapter or models/full (per train.finetuning_type), the task YAMLs
         named in eval.tasks (keep them, and their data, under configs/benchmarks/), params.yaml
         eval.tasks / num_fewshot / limit / batch_size / task / n_shot / lang / task_dir /
         compare_base (see dvc.yaml for the exact keys)
Writes:  metrics/benchmarks.json (`benchmarks.<task>.<metric>`: tuned, base, diff, stderr,
         base_stderr; `documents.<task>`), logged into the train stage's MLflow run; with
         eval.tasks empty it writes an empty report and loads nothing
Command: dvc repro benchmark   (or: tunepipe eval params.yaml)

Its own stage so that a new task list re-runs only this (the evaluate stage's eval-split
scores and the merge stay cached).
"""

from tunepipe.config.loader import load_config
from tunepipe.errors import stage_main
from tunepipe.evaluate.benchmarks import print_benchmarks, run_benchmarks
from tunepipe.layout import Layout


def main() -> None:
    cfg = load_config("params.yaml")
    print_benchmarks(run_benchmarks(cfg, Layout.at(".")))


if __name__ == "__main__":
    stage_main(main)
