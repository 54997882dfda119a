"""LLaMA-Factory keys that are not tunepipe config fields, and what happens to each.

Keys that are tunepipe fields (same name, same meaning) live in `groups.py` / `training.py`. The rest
fall into four lists, so that no LLaMA-Factory key is ever silently ignored:

- OPERATIONAL_KEYS: purely operational (worker counts, timeouts); accepted with a
  one-line warning because they cannot change the trained model.
- NOOP_VALUES: accepted only at the value that matches what tunepipe does anyway.
- INSTEAD_KEYS: integrations tunepipe does not have (Unsloth); any value accepted, and a
  non-default one says in one line what tunepipe does instead.
- UNSUPPORTED_KEYS: features tunepipe does not have (yet); an error lists them.

TUNEPIPE_ONLY_KEYS names the config fields LLaMA-Factory does not have.
`python -m tunepipe.config.docgen` renders all of this into the key table of
docs/migrating-from-llama-factory.md.
"""

from __future__ import annotations

OPERATIONAL_KEYS: dict[str, str] = {
    "ddp_timeout": "process-group timeout; accelerate's default applies",
    "ddp_find_unused_parameters": "DDP tuning flag; tunepipe sets it from the model",
    "overwrite_cache": "tunepipe caches through DVC, which re-runs tokenize when its inputs change",
    "dataloader_num_workers": "batches come from in-memory Arrow shards",
    "use_cpu": "the device is picked automatically (GPU when present)",
    "logging_dir": "logs go to MLflow and metrics/",
    "do_eval": "evaluation is the eval stage (`tunepipe eval`); eval_strategy covers in-training eval",
    "do_predict": "prediction is the eval stage (`tunepipe eval`)",
    "include_effective_tokens_per_second": "metrics/train.json always reports real tokens/s",
    "save_strategy": "checkpoints follow save_steps",
    "save_only_model": "checkpoints always keep optimizer state so resume is exact",
    "dataloader_pin_memory": "operational",
    "ddp_backend": "accelerate picks nccl on GPU and gloo on CPU",
    "disable_tqdm": "progress bars are always shown on long loops",
    "remove_unused_columns": "tokenized shards hold only the columns training reads",
    "local_rank": "set by the launcher (accelerate)",
}

NOOP_VALUES: dict[str, object] = {
    "upcast_layernorm": False,
    "upcast_lmhead_output": False,
    "shift_attn": False,
    "low_cpu_mem_usage": True,
    "use_fast_tokenizer": True,
    "use_cache": True,
    "split_special_tokens": False,
    "eval_on_each_dataset": False,
    "ignore_pad_token_for_loss": True,
    "print_param_status": False,
    "train_from_scratch": False,
    "rope_scaling": None,
    "disable_shuffling": False,
    "use_swanlab": False,
    "enable_thinking": True,
    "compute_accuracy": False,
    "quantization_method": "bnb",
    "finetuning_args": None,
    "apollo_scale_front": False,  # transformers' APOLLO optimizer (use_apollo) has no way to pass it
    "use_mca": False,
    "use_kt": False,
    "use_v1_kernels": False,
    "use_kv_cache": True,
    "fp8": False,
    "save_safetensors": True,
    "download_mode": "reuse_dataset_if_exists",
}

# LLaMA-Factory speed-ups tunepipe does not integrate: any value is accepted, so one YAML runs
# on both tools; a value other than LLaMA-Factory's default prints one line saying what
# tunepipe does instead. key -> (LLaMA-Factory's default, what tunepipe does instead)
INSTEAD_KEYS: dict[str, tuple[object, str]] = {
    "use_unsloth": (False, ("tunepipe has no Unsloth integration; it trains with transformers + PEFT, "
                            "padding-free batches and a loss that projects only trained tokens")),
    "use_unsloth_gc": (False, ("tunepipe has no Unsloth integration; set gradient_checkpointing: true "
                               "for transformers' own activation checkpointing")),
}

# The hub keys that would upload: an offline mirror cannot take uploads to test them against.
# GPTQ calibration itself runs on CPU through transformers' GPTQConfig (optimum + gptqmodel, the
# extra `quantized`): checked by hand on a tiny Llama, 8 CPU s with GPTQMODEL_DISABLE_PACK_EXT=1
# (gptqmodel's packing otherwise JIT-compiles a C++ extension first). The export stage does not call it.
_GPTQ_EXPORT = ("quantized (GPTQ) export is not built yet (optimum + gptqmodel can calibrate on CPU; "
                "tunepipe's export does not call them)")
_UPLOAD = ("no hub uploads from tunepipe; after `tunepipe export`, upload the export dir with "
           "`hf upload ORG/NAME EXPORT_DIR`")

UNSUPPORTED_KEYS: dict[str, str] = {
    "adapter_folder": "name adapter dirs in adapter_name_or_path",
    "ms_hub_token": "ModelScope is not supported; models and data come from the Hugging Face Hub (hf_hub_token)",
    "om_hub_token": "Modelers is not supported; models and data come from the Hugging Face Hub (hf_hub_token)",
    "mixture_of_depths": ("mixture-of-depth (1.2.0, its latest release) needs transformers < 5: it imports "
                          "TRANSFORMERS_CACHE and calls decoder layers with 4.x arguments (past_key_value, "
                          "output_attentions)"),
    "export_quantization_bit": _GPTQ_EXPORT,
    "export_quantization_dataset": _GPTQ_EXPORT,
    "export_quantization_nsamples": _GPTQ_EXPORT,
    "export_quantization_maxlen": _GPTQ_EXPORT,
    "export_hub_model_id": _UPLOAD,
    "reward_model": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "reward_model_adapters": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "reward_model_quantization_bit": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "reward_model_type": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "ppo_buffer_size": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "ppo_epochs": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "ppo_score_norm": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "ppo_target": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "ppo_whiten_rewards": "PPO is not supported yet (TRL 1.16 has no PPO trainer); for RL from a reward use stage: grpo, whose reward_funcs take a stage-rm output dir",
    "max_length": "use max_new_tokens",
    "vllm_config": "extra vLLM engine arguments are not passed through (vllm_maxlen, vllm_gpu_util, vllm_enforce_eager and vllm_max_lora_rank are)",
    "model_max_length": "use cutoff_len",
    "device_map": "the device is picked automatically",
    "offload_folder": "not supported",
    "block_diag_attn": "packing always uses block-diagonal attention",
    "push_to_hub": _UPLOAD,
    "hub_model_id": _UPLOAD,
    "infer_dtype": "inference uses model.dtype",
    "quantization_device_map": "the device is picked automatically",
    "fp8_backend": "FP8 training is not supported",
    "fp8_enable_fsdp_float8_all_gather": "FP8 training is not supported",
    "image_do_pan_and_scan": "multimodal data is not supported",
    "crop_to_patches": "multimodal data is not supported",
    "use_audio_in_video": "multimodal data is not supported",
    "audio_sampling_rate": "multimodal data is not supported",
    "swanlab_project": "SwanLab is not supported; runs are tracked in MLflow",
    "swanlab_workspace": "SwanLab is not supported; runs are tracked in MLflow",
    "swanlab_run_name": "SwanLab is not supported; runs are tracked in MLflow",
    "swanlab_mode": "SwanLab is not supported; runs are tracked in MLflow",
    "swanlab_api_key": "SwanLab is not supported; runs are tracked in MLflow",
    "swanlab_logdir": "SwanLab is not supported; runs are tracked in MLflow",
    "swanlab_lark_webhook_url": "SwanLab is not supported; runs are tracked in MLflow",
    "swanlab_lark_secret": "SwanLab is not supported; runs are tracked in MLflow",
    "system_message": "put the system prompt in the data (system column)",
    "sglang_maxlen": "SGLang inference is not supported",
    "sglang_mem_fraction": "SGLang inference is not supported",
    "sglang_tp_size": "SGLang inference is not supported",
    "sglang_config": "SGLang inference is not supported",
    "sglang_lora_backend": "SGLang inference is not supported",
    "kt_optimize_rule": "KTransformers is not supported",
    "cpu_infer": "KTransformers is not supported",
    "chunk_size": "KTransformers is not supported",
    "mode": "KTransformers is not supported",
    "kt_maxlen": "KTransformers is not supported",
    "kt_use_cuda_graph": "KTransformers is not supported",
    "kt_mode": "KTransformers is not supported",
    "kt_force_think": "KTransformers is not supported",
    "ray_storage_filesystem": "cloud storage (S3 / GCS) for Ray Train is not supported; ray_storage_path takes a local or shared path",
    "fsdp_config": "use train.accelerate_config with an FSDP accelerate config (configs/accelerate/)",
    "logging_strategy": "logging follows logging_steps",
    "data_seed": "split_seed orders the data split; seed the training order",
    "generation_max_length": "use max_new_tokens",
}

# LLaMA-Factory's other names for a tunepipe key (same meaning): read as that key.
ALIAS_KEYS: dict[str, str] = {
    "eval_num_beams": "num_beams",
    "generation_num_beams": "num_beams",
}

# tunepipe config fields that LLaMA-Factory does not have (every other field is a
# LLaMA-Factory key with the same meaning). The migration guide lists them apart.
TUNEPIPE_ONLY_KEYS: frozenset[str] = frozenset({
    "dtype", "overlong", "split_seed", "on_invalid", "num_processes", "accelerate_config",
    "num_machines", "machine_rank", "main_process_ip", "main_process_port",
    "precompute_ref_log_probs", "max_predict_samples", "compare_base", "identity_keywords",
    "tracking_uri", "experiment_name", "template_date", "tasks", "num_fewshot", "limit",
})
