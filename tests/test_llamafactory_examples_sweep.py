"""Every train / merge / inference YAML LLaMA-Factory ships under examples/ (read from
../shared/llamafactory-examples/ as it is, never copied) through tunepipe's config loader: the ones
that load, and the exact set still refused, each with the keys that refuse it. When a key lands,
its YAMLs leave REFUSED here (and the counts in the docstring of REFUSED move).

Not counted (not configs of a train / merge / inference run): accelerate/ and
ktransformers/accelerate/ (accelerate launcher configs), v1/ (LLaMA-Factory's next config format)
and extras/multi_tokens/tokens_cfg.yaml (a list of tokens for add_special_tokens).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "llamafactory-examples"
NOT_RUN_CONFIGS = ("accelerate/", "ktransformers/accelerate/", "v1/", "extras/multi_tokens/tokens_cfg.yaml")

# 66 YAMLs: 48 load, 18 refused. Of the 48, tests/e2e/test_hub_llamafactory_examples.py runs 42
# (a few steps each on a tiny stand-in from the local hub: the GPTQ / AWQ ones, the 5 DeepSpeed ones,
# ZeRO-3 and ASFT's ZeRO-0, and Qwen3.5-MoE included); 1 is refused when its model loads (the
# pre-quantized AQLM checkpoint: its REFUSED_AT_LOAD); 5 do not run there, each with its reason (its
# NOT_RUN_HERE: MOSS-VL, Ray's 4 workers). The 18 refused here, by family: hardware or
# another engine (Ascend NPU kernels `use_v1_kernels`; KTransformers `use_kt` / `kt_*`; Megatron parallel sizes; FP8 needs an FP8 GPU);
# GPTQ export (`export_quantization_*`); mixture of depths (the mixture-of-depth package needs
# transformers < 5).
REFUSED: dict[str, set[str]] = {
    "ascend/qwen3_5_full_sft_fsdp2.yaml": {"use_v1_kernels"},
    "ascend/qwen3_full_sft_fsdp2.yaml": {"use_v1_kernels"},
    "ascend/qwen3moe_full_sft_fsdp.yaml": {"use_v1_kernels"},
    "ascend/qwen3vlmoe_full_sft_fsdp2.yaml": {"use_v1_kernels"},
    "ascend/qwen3vlmoe_lora_sft_fsdp.yaml": {"use_v1_kernels"},
    "extras/fp8/llama3_fp8_deepspeed_sft.yaml": {"fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather"},
    "extras/fp8/llama3_fp8_fsdp_sft.yaml": {"fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather"},
    "extras/mod/llama3_full_sft.yaml": {"mixture_of_depths"},
    "ktransformers/train_lora/deepseek_v2_lora_sft_kt.yaml": {"use_kt"},
    "ktransformers/train_lora/deepseek_v3_int8_lora_sft_kt.yaml": {"kt_config", "kt_cpu_activation",
        "kt_non_expert_weight_path", "kt_weight_path", "use_kt"},
    "ktransformers/train_lora/deepseek_v3_lora_sft_kt.yaml": {"kt_config", "kt_cpu_activation", "use_kt"},
    "ktransformers/train_lora/qwen3_5moe_lora_sft_kt.yaml": {"kt_config", "kt_cpu_activation", "use_kt"},
    "ktransformers/train_lora/qwen3moe_lora_sft_kt.yaml": {"use_kt"},
    "ktransformers/train_lora/qwen3vlmoe_lora_sft_kt.yaml": {"kt_config", "kt_cpu_activation", "use_kt"},
    "megatron/qwen2_vl_full.yaml": {"apply_rope_fusion", "bias_activation_fusion",
        "pipeline_model_parallel_size", "sequence_parallel", "tensor_model_parallel_size",
        "use_distributed_optimizer"},
    "megatron/qwen3_moe_full.yaml": {"apply_rope_fusion", "bias_activation_fusion",
        "expert_model_parallel_size", "moe_grouped_gemm", "moe_token_dispatcher_type", "overlap_grad_reduce",
        "overlap_param_gather", "pipeline_model_parallel_size", "recompute_granularity", "sequence_parallel",
        "tensor_model_parallel_size", "use_distributed_optimizer"},
    "megatron_bridge/llama3_sft.yaml": {"context_parallel_size", "expert_model_parallel_size",
        "export_hf_on_finish", "mixed_precision", "overlap_grad_reduce", "overlap_param_gather",
        "pipeline_model_parallel_size", "sequence_parallel", "tensor_model_parallel_size",
        "use_distributed_optimizer", "use_packed_sequences"},
    "merge_lora/qwen3_gptq.yaml": {"export_quantization_bit", "export_quantization_dataset"},
}


def example_yamls() -> list[str]:
    return sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.yaml")
                  if not p.relative_to(EXAMPLES).as_posix().startswith(NOT_RUN_CONFIGS))


def refused_keys(message: str) -> set[str]:
    """The keys a loader error names: unknown keys and LLaMA-Factory keys not supported (yet)."""
    keys = set(re.findall(r"unknown key '([^']+)'", message))
    listed = re.search(r"does not support yet: (.*)", message)
    if listed:
        keys |= set(re.findall(r"(?:^|; )(\w+) \(", listed.group(1)))
    return keys


def test_every_example_loads_or_is_refused_for_the_listed_keys(caplog):
    if not EXAMPLES.is_dir():
        pytest.skip(f"LLaMA-Factory's examples not found at {EXAMPLES}")
    yamls = example_yamls()
    assert len(yamls) == 66
    refused = {}
    with caplog.at_level(logging.ERROR):  # the accepted-and-ignored keys warn; not what is checked here
        for name in yamls:
            try:
                load_config(EXAMPLES / name)
            except TunepipeError as err:
                refused[name] = refused_keys(str(err))
    assert refused == REFUSED
    assert (len(yamls) - len(refused), len(refused)) == (48, 18)
