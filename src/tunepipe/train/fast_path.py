"""Speed switches of a training step that leave its numbers unchanged (docs/benchmarks.md has the
measurements behind each default).

- `torch_compile: true` (LLaMA-Factory's key): regional compilation. Each decoder layer is
  compiled in place (`nn.Module.compile`), not the whole model: the layers share one class, so
  dynamo traces and inductor compiles the layer code once and every layer reuses it (its weights
  are graph inputs), which keeps compile time to one layer's instead of thirty. Shapes are
  dynamic from the start: padding-free batches change length every step, and a static first
  compile would be thrown away at step 2. The per-sample attention of padding-free batches
  (`varlen_attention`) stays outside the graphs (it reads the sample boundaries as Python ints,
  which would otherwise mean one graph per batch layout): each layer runs as two graphs around it.
  Off by default on CPU and GPU: on the CPU measured, steady steps cost 14% fewer CPU seconds,
  but step 1 pays the compile (~10 CPU s with inductor's disk cache warm, minutes cold), more
  than a short run gains (docs/benchmarks.md); no GPU was measured. Mixture-of-experts models
  are refused (`model_setup.refuse_compile_of_experts`): their experts recompile per routing pattern.
- `fused_optimizer: true` (default): the default `optim: adamw_torch` runs as torch's fused AdamW
  kernel (one kernel over every tensor) instead of its per-tensor loop: the same update (equal to
  1e-9 here), and LoRA's hundreds of small tensors make the loop's per-op overhead a visible share
  of a step. Not under DeepSpeed (its own optimizer) or an accelerate config (FSDP's sharded
  tensors): there the Trainer's default stays.
- `fused_lora: true` (default): LoRA layers that read one input (q/k/v, gate/up) run one A
  matmul over their concatenated A weights, and every LoRA layer adds its B product with
  `scaling` folded into one addmm; PEFT keeps its modules and files, only their forward is
  grouped (`train.model.lora_groups`, installed by `adapters.attach_lora`). Not under DeepSpeed
  (ZeRO-3 gathers each LoRA Linear's weight in that Linear's own forward hook, which the
  grouped forward does not call) nor an accelerate config (sharded weights: not checked), nor
  with `torch_compile`: exact together (loss equal, LoRA gradients to 1.3e-7 with aot_eager on
  the tiny Llama), but dynamo then traces 21 graphs instead of 7 (it guards on the group's
  pending slices and recompiles), which would triple a compile warm-up that already takes minutes.
- No dropout kernel when `lora_dropout: 0`: PEFT itself builds `nn.Identity` then (checked by a
  test), and no float32 round trip of LoRA inputs under autocast (`adapters.skip_input_casts_under_autocast`).
"""

from __future__ import annotations

import logging

from tunepipe.config import TrainConfig

log = logging.getLogger(__name__)


def optimizer_name(train: TrainConfig) -> str:
    """transformers' `optim` name: `adamw_torch_fused` for the default AdamW where fused applies."""
    if train.optim == "adamw_torch" and train.fused_optimizer and not (train.deepspeed or train.accelerate_config):
        return "adamw_torch_fused"
    return train.optim


def fuses_lora(train: TrainConfig) -> bool:
    """Whether `attach_lora` gives PEFT's LoRA layers the grouped forward (`fused_lora`)."""
    return bool(train.fused_lora and train.finetuning_type == "lora" and not train.torch_compile
                and not (train.deepspeed or train.accelerate_config))


def compile_decoder_layers(layers, backend: str = "inductor") -> int:
    """Compile every decoder layer (`model_setup.decoder_layers(model)`) in place; returns how
    many. The state dict keeps its names (no `_orig_mod.` wrapper), so saving is unchanged."""
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    log.info("torch_compile: %d decoder layers of %s compiled (%s, regional)", len(layers),
             type(layer).__name__, backend)
    return len(layers)
