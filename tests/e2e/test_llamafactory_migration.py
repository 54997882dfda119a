"""LLaMA-Factory's tutorial workflow, its files unchanged, through tunepipe.

Four YAMLs as the tutorial writes them (the LoRA SFT example, its predict, inference and
merge examples: `### model`, `### method`, ... sections, `dataset: a, b`, the later YAMLs
naming the train `output_dir` as `adapter_name_or_path`) run through `tunepipe train`,
`tunepipe eval`, `tunepipe chat` and `tunepipe export`. Only what points at this machine
differs (model path, data folder, output dirs), what keeps it to a minute on two cores
(the tiny model, `max_samples`, step counts), and `bf16: true` where the tutorial has
`fp16: true`, which needs a CUDA GPU (tests/test_devices.py checks the refusal). The data
folder is LLaMA-Factory's own demo folder, read in place. docs/migrating-from-llama-factory.md
walks through the same workflow.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

from tunepipe.cli import main as tunepipe

TRAIN_YAML = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity, alpaca_en_demo
dataset_dir: {dataset_dir}
template: qwen
cutoff_len: 4096
max_samples: 10
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: {output_dir}
logging_steps: 5
save_steps: 10
plot_loss: true
overwrite_output_dir: true
save_only_model: false
restore_callback_states_from_checkpoint: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
num_train_epochs: 2.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true  # the tutorial's fp16: true needs a CUDA GPU
ddp_timeout: 180000000
resume_from_checkpoint: null
enable_liger_kernel: true  # GPU-only: a warning here, and training goes on

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 5
"""

PREDICT_YAML = """\
### model
model_name_or_path: {model}
adapter_name_or_path: {train_dir}
trust_remote_code: true

### method
stage: sft
do_predict: true
finetuning_type: lora

### dataset
eval_dataset: identity, alpaca_en_demo
dataset_dir: {dataset_dir}
template: qwen
cutoff_len: 4096
max_samples: 3
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: {output_dir}
overwrite_output_dir: true
report_to: none

### eval
per_device_eval_batch_size: 1
predict_with_generate: true
max_new_tokens: 8
ddp_timeout: 180000000
"""

INFER_YAML = """\
model_name_or_path: {model}
adapter_name_or_path: {train_dir}
template: qwen
infer_backend: huggingface  # choices: [huggingface, vllm, sglang, ktransformers]
trust_remote_code: true
"""

MERGE_YAML = """\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: {model}
adapter_name_or_path: {train_dir}
template: qwen
trust_remote_code: true

### export
export_dir: {export_dir}
export_size: 2
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""

LINEAR_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_the_tutorial_workflow_trains_predicts_chats_and_merges(tmp_path, tiny_model_dir, lf_demo_dir,
                                                                monkeypatch, caplog, capsys):
    monkeypatch.chdir(tmp_path)  # the merge YAML has no output_dir: its metrics go under saves/run
    caplog.set_level(logging.INFO)
    train_dir = tmp_path / "saves" / "tiny" / "lora" / "sft"
    fill = {"model": tiny_model_dir, "dataset_dir": lf_demo_dir, "train_dir": train_dir}

    # 1. llamafactory-cli train examples/train_lora/..._lora_sft.yaml
    train_yaml = write(tmp_path / "lora_sft.yaml", TRAIN_YAML.format(output_dir=train_dir, **fill))
    assert tunepipe(["train", str(train_yaml)]) == 0
    said = messages(caplog)
    assert "ignoring operational LLaMA-Factory key ddp_timeout" in said
    assert "enable_liger_kernel: Liger kernels run on a CUDA GPU only" in said
    meta = json.loads((train_dir / "data" / "tokenized" / "meta.json").read_text())
    assert meta["template"] == "qwen" and meta["cutoff_len"] == 4096
    assert meta["rows"] == {"train": 18, "eval": 2}  # max_samples per dataset, val_size: 0.1 of 20
    metrics = json.loads((train_dir / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 18 and "eval_loss" in metrics  # 2 epochs of 9 steps; eval_strategy: steps
    adapter = train_dir / "models" / "adapter"
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16  # LLaMA-Factory's 2 x rank
    assert {name.rsplit(".", 1)[-1] for name in adapter_cfg["target_modules"]} == LINEAR_MODULES  # all
    assert (adapter / "training_loss.png").is_file()  # plot_loss

    # 2. llamafactory-cli train examples/train_lora/..._lora_predict.yaml: a fresh output_dir
    predict_dir = tmp_path / "saves" / "tiny" / "lora" / "predict"
    predict_yaml = write(tmp_path / "lora_predict.yaml", PREDICT_YAML.format(output_dir=predict_dir, **fill))
    caplog.clear()
    assert tunepipe(["eval", str(predict_yaml)]) == 0
    resolved = f"adapter_name_or_path {train_dir} is a tunepipe output_dir: using its trained adapter {adapter}"
    assert messages(caplog).count(resolved) == 1
    report = json.loads((predict_dir / "metrics" / "eval.json").read_text())
    assert report["eval_rows"] == 6 and report["predict_samples"] == 6  # eval_dataset, max_samples: 3 each
    assert len((predict_dir / "reports" / "predictions.jsonl").read_text().splitlines()) == 6

    # 3. llamafactory-cli chat examples/inference/..._lora_sft.yaml, a line piped in
    infer_yaml = write(tmp_path / "infer.yaml", INFER_YAML.format(**fill))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who are you?\n/exit\n"))
    caplog.clear()
    capsys.readouterr()
    assert tunepipe(["chat", str(infer_yaml), "max_new_tokens=4"]) == 0
    assert messages(caplog).count(resolved) == 1
    assert sum(line.startswith("Assistant:") for line in capsys.readouterr().out.splitlines()) == 1

    # 4. llamafactory-cli export examples/merge_lora/..._lora_sft.yaml
    export_dir = tmp_path / "output" / "tiny_lora_sft"
    merge_yaml = write(tmp_path / "merge_lora.yaml", MERGE_YAML.format(export_dir=export_dir, **fill))
    caplog.clear()
    assert tunepipe(["export", str(merge_yaml)]) == 0
    assert messages(caplog).count(resolved) == 1
    written = {p.name for p in export_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "Modelfile"} <= written
    assert "model-00001-of-00001.safetensors" in written and "model.safetensors.index.json" in written
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in written)
    assert_export_equals_base_plus_adapter(export_dir, tiny_model_dir, adapter)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def messages(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def assert_export_equals_base_plus_adapter(export_dir: Path, base_dir: Path, adapter: Path) -> None:
    """The export reloads with plain transformers and computes base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          adapter)
    with torch.no_grad():
        got = merged(**prompt).logits
        want = reference(**prompt).logits
        with reference.disable_adapter():
            untrained = reference(**prompt).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, untrained, atol=1e-4)  # training moved the adapter off zero
