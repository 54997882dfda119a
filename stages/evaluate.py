"""evaluate stage: score the tuned model against its base on the eval split.

Reads:   data/tokenized/eval, models/base, models/adapter or models/full (per
         train.finetuning_type), params.yaml eval.*, train.stage / finetuning_type /
         per_device_eval_batch_size / seed / pref_* (see dvc.yaml for the exact keys)
Writes:  metrics/eval.json (tuned, base and diff for eval_loss, perplexity, token_accuracy,
         ROUGE-1/2/L, BLEU-4, identity_accuracy; preference rewards or reward-model
         accuracy where they apply), reports/predictions.jsonl ({prompt, predict, label,
         base_predict}); the metrics are logged into the train stage's MLflow run
Command: dvc repro evaluate   (or: tunepipe eval params.yaml)
"""

from tunepipe.config.loader import load_config
from tunepipe.errors import stage_main
from tunepipe.evaluate.run import print_table, run_evaluate
from tunepipe.layout import Layout


def main() -> None:
    cfg = load_config("params.yaml")
    report = run_evaluate(cfg, Layout.at("."))
    print_table(report)


if __name__ == "__main__":
    stage_main(main)
