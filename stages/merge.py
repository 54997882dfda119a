"""merge stage: merge the adapter into the base and export a standalone model.

Reads:   models/base, models/adapter or models/full (per train.finetuning_type), or
         model.adapter_name_or_path when set; params.yaml export.*, model.dtype,
         model.quantization_bit (see dvc.yaml for the exact keys)
Writes:  export.export_dir (default models/export): sharded safetensors + index, config,
         generation config, tokenizer with its chat template, Ollama Modelfile;
         metrics/export.json (shards, sizes, max |logit diff| vs base + adapter)
Command: dvc repro merge   (or: tunepipe export params.yaml)
"""

from tunepipe.config.loader import load_config
from tunepipe.errors import stage_main
from tunepipe.export.merge import run_export
from tunepipe.layout import Layout


def main() -> None:
    cfg = load_config("params.yaml")
    metrics = run_export(cfg, Layout.at("."))
    print(f"merge: wrote {cfg.export.export_dir} ({metrics['shards']} shards, "
          f"max |logit diff| {metrics['max_abs_logit_diff']:.3g})")


if __name__ == "__main__":
    stage_main(main)
