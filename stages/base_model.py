"""base_model stage: make the base model a plain local HF dir.

Reads:   params.yaml model.model_name_or_path, model.model_revision, model.cache_dir, model.dtype
         (a Hub repo id is downloaded into huggingface_hub's cache: HF_ENDPOINT, HF_TOKEN apply)
Writes:  models/base/ (safetensors + config + generation config + tokenizer with its
         chat template), or a manifest pointing at a local HF dir with its content hash,
         or a manifest naming a Hub repo, the requested revision and the commit it resolved to
Command: dvc repro base_model   (or: tunepipe base-model params.yaml)
"""

from tunepipe.config.loader import load_config
from tunepipe.errors import stage_main
from tunepipe.layout import Layout
from tunepipe.models.base import prepare_base_model


def main() -> None:
    cfg = load_config("params.yaml")
    out = prepare_base_model(cfg.model, Layout.at(".").base_model)
    print(f"base_model: wrote {out}")


if __name__ == "__main__":
    stage_main(main)
