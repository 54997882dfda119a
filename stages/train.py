"""train stage: fine-tune the base model on the tokenized shards.

Reads:   data/tokenized/{train,eval} + meta.json, models/base, params.yaml model.* and
         train.* (see dvc.yaml for the exact keys), tracking.* (MLflow; not a DVC param:
         where a run is logged does not change what is trained)
Writes:  models/adapter/ (PEFT) for lora, or models/full/ for freeze / full (the other dir
         holds only NOT_USED.md), each with tunepipe_run.json; checkpoints/ (persistent:
         a killed run resumes from its last checkpoint on the next `dvc repro`);
         metrics/train.json, plots/train_loss.csv; an MLflow run
Command: dvc repro train   (or: tunepipe train params.yaml, which also validates and tokenizes)
"""

from tunepipe.config.loader import load_config
from tunepipe.errors import stage_main
from tunepipe.layout import Layout
from tunepipe.train import run_train


def main() -> None:
    cfg = load_config("params.yaml")
    summary = run_train(cfg, Layout.at("."))
    if summary:
        print(f"train: {summary['steps']} steps, final loss {summary['final_loss']}, "
              f"{summary['tokens_per_second']} tokens/s")


if __name__ == "__main__":
    stage_main(main)
