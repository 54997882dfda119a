"""validate stage: check every dataset row against its JSON Schema and write canonical rows.

Reads:   params.yaml data.dataset, data.eval_dataset, data.dataset_dir, data.on_invalid,
         train.stage (it decides what a row must be: sft, preference, kto or pretraining
         text); data/dataset_info.json and the files it names (data/raw/); schemas/
Writes:  data/validated/ (<dataset>.jsonl canonical rows + manifest.json),
         reports/validation.json (per dataset: rows read / valid / invalid, each invalid
         row with file, row, line, JSON pointer and message), reports/rejected.jsonl
         (rows dropped with data.on_invalid: drop, unchanged, with their reasons)
Command: dvc repro validate   (or: tunepipe validate params.yaml); exit code 2 on bad rows
"""

from tunepipe.config.loader import load_config
from tunepipe.data.validate import run_validate
from tunepipe.errors import stage_main
from tunepipe.layout import Layout


def main() -> None:
    cfg = load_config("params.yaml")
    report = run_validate(cfg, Layout.at("."))
    for name, summary in report["datasets"].items():
        print(f"validate: {name}: {summary['valid']} valid of {summary['rows_read']} rows "
              f"({summary['invalid']} dropped)")


if __name__ == "__main__":
    stage_main(main)
