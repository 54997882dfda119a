"""A LLaMA-Factory user's files run unchanged through `tunepipe train` and `tunepipe export`.

The training YAML is the foundation issue's LLaMA-Factory example (flat keys, comments
and all); only what points at this machine differs (model path, data folder, output
dir) plus what keeps it to seconds (steps, samples, cutoff_len, no fp16 on CPU, eval off).
The data folder is LLaMA-Factory's own demo folder, read in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.cli import main as tunepipe

LF_TRAIN_YAML = """\
### model
model_name_or_path: {model}
### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
lora_rank: 32
### dataset
dataset: identity, alpaca_en_demo
dataset_dir: {dataset_dir}
template: qwen
cutoff_len: 256
max_samples: 16
overwrite_cache: true
preprocessing_num_workers: 16
### output
output_dir: {output_dir}
logging_steps: 1
save_steps: 200
plot_loss: true
# overwrite_output_dir: true
restore_callback_states_from_checkpoint: true
save_total_limit: 5
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
max_steps: 2
max_grad_norm: 1.0
learning_rate: 2.0e-5
num_train_epochs: 1
lr_scheduler_type: cosine
warmup_ratio: 0.1
fp16: false
upcast_layernorm: false
ddp_find_unused_parameters: false
ddp_timeout: 180000000
report_to: none
### eval
per_device_eval_batch_size: 1
eval_strategy: "no"
"""

LF_MERGE_YAML = """\
### model
model_name_or_path: {model}
adapter_name_or_path: {adapter}
template: qwen
### export
export_dir: {export_dir}
export_size: 5
export_device: cpu
export_legacy_format: false
"""

LINEAR_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
def test_llamafactory_yaml_trains_and_exports_through_tunepipe(tmp_path, smollm2_base_dir, lf_demo_dir):
    out = tmp_path / "saves" / "smollm2" / "lora" / "sft"
    train_cfg = tmp_path / "sft.yaml"
    train_cfg.write_text(LF_TRAIN_YAML.format(model=smollm2_base_dir, dataset_dir=lf_demo_dir, output_dir=out))
    assert tunepipe(["train", str(train_cfg)]) == 0

    validated = json.loads((out / "data" / "validated" / "manifest.json").read_text())
    on_disk = {name: len(json.loads((lf_demo_dir / f"{name}.json").read_text()))
               for name in ("identity", "alpaca_en_demo")}
    assert _train_rows(validated) == on_disk  # every row validated, the files used unchanged
    meta = json.loads((out / "data" / "tokenized" / "meta.json").read_text())
    assert meta["rows"]["train"] == 2 * 16  # max_samples applies per dataset, as in LLaMA-Factory
    adapter = out / "models" / "adapter"
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 32 and adapter_cfg["lora_alpha"] == 64  # LLaMA-Factory's 2 x rank
    assert set(adapter_cfg["target_modules"]) == LINEAR_MODULES  # lora_target: all
    assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 2

    export_dir = tmp_path / "export"
    merge_cfg = tmp_path / "merge.yaml"
    merge_cfg.write_text(LF_MERGE_YAML.format(model=smollm2_base_dir, adapter=adapter, export_dir=export_dir))
    assert tunepipe(["export", str(merge_cfg)]) == 0

    written = {p.name for p in export_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "Modelfile"} <= written
    assert any(name.endswith(".safetensors") for name in written)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in written)
    _assert_export_equals_base_plus_adapter(export_dir, smollm2_base_dir, adapter)


def _train_rows(manifest: dict) -> dict[str, int]:
    return {entry["name"]: entry["rows"] for entry in manifest["train"]}


def _assert_export_equals_base_plus_adapter(export_dir: Path, base_dir: Path, adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          adapter)
    with torch.no_grad():
        got = merged(**prompt).logits
        want = reference(**prompt).logits
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
