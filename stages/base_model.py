"""base_model stage: make the base model a plain local HF dir.

Reads:   params.yaml model.model_name_or_path, model.dtype
Writes:  models/base/ (safetensors + config + generation config + tokenizer with its
         chat template), or a manifest pointing at a local HF dir with its content hash
Command: dvc repro base_model   (or: tunepipe base-model params.yaml)
"""

from tunepipe.config_loader import load_config
from tunepipe.errors import stage_main
from tunepipe.layout import Layout
from tunepipe.modeling import prepare_base_model


def main() -> None:
    cfg = load_config("params.yaml")
    out = prepare_base_model(cfg.model, Layout.at(".").base_model)
    print(f"base_model: wrote {out}")


if __name__ == "__main__":
    stage_main(main)
