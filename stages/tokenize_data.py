"""tokenize stage: validated rows -> tokenized Arrow shards for the train stage.

(Named tokenize_data.py, not tokenize.py: `python stages/x.py` puts stages/ first on
sys.path, where a tokenize.py would shadow the standard library's `tokenize` module.)

Reads:   data/validated/, models/base (the tokenizer and its chat template), params.yaml
         data.template, cutoff_len, overlong, max_samples, val_size, split_seed,
         mix_strategy, interleave_probs, train_on_prompt, mask_history, packing,
         neat_packing, tool_format, train.stage, model.trust_remote_code
Writes:  data/tokenized/{train,eval} (HF datasets, load_from_disk) + meta.json,
         metrics/data.json (rows in/out, tokens, truncated, dropped, mean/max length,
         packing efficiency)
Command: dvc repro tokenize   (or: tunepipe tokenize params.yaml)
"""

from tunepipe.config.loader import load_config
from tunepipe.data.tokenize import run_tokenize
from tunepipe.errors import stage_main
from tunepipe.layout import Layout


def main() -> None:
    cfg = load_config("params.yaml")
    metrics = run_tokenize(cfg, Layout.at("."))
    for split in ("train", "eval"):
        stats = metrics[split]
        print(f"tokenize: {split}: {stats['rows_out']} rows of {stats['rows_in']}, {stats['tokens']} tokens, "
              f"{stats['truncated']} truncated, {stats['dropped']} dropped")


if __name__ == "__main__":
    stage_main(main)
