"""merge stage / `tunepipe export`: one standalone model dir from base + adapters.

LoRA / DoRA adapters are merged into the base in order (`adapter_name_or_path`, or the
train stage's `models/adapter`); a full or freeze fine-tune is exported as it is. The
base is always loaded unquantized in `model.dtype`, also for an adapter trained with
QLoRA: merging into 4-bit weights would bake the quantization error into every weight
(or need a lossy re-quantization), while the unquantized base + the adapter is the model
the adapter's update was meant for, at full precision. See README "Merging and exporting".

The merge is computed in float32 and rounded once to `model.dtype` when saved (a half
precision merge would round the update and then the sum). The export is written into a
temporary sibling and renamed into place only after the equivalence check passed:
max |logits(export reloaded from disk) - logits(base + adapter, unmerged)| over a few
chat prompts, both computed in float32, must stay within a tolerance for the dtype:
what is left is the one rounding of each merged weight to `model.dtype`.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from tunepipe.config import Config
from tunepipe.data.chat.chat_format import stop_token_ids
from tunepipe.data.chat.named_templates import stop_words
from tunepipe.data.chat.templates import apply_template
from tunepipe.errors import TunepipeError
from tunepipe.export import gguf_export
from tunepipe.export.modelfile import MODELFILE, modelfile_text
from tunepipe.export.shards import export_size_bytes, save_sharded, verify_shards
from tunepipe.export.vision import copy_processor_files, vision_probes
from tunepipe.io_utils import atomic_dir, write_json_atomic, write_text_atomic
from tunepipe.layout import Layout
from tunepipe.models.base import follow_manifest, is_vision_model, load_causal_lm, torch_dtype
from tunepipe.models.trained import (
    TrainedSource,
    apply_adapters,
    base_dir_for,
    cli_config,
    device_for,
    load_base,
    tokenizer_for,
    trained_source,
)
from tunepipe.tracking.tracker import join_train_run

log = logging.getLogger(__name__)

EXPORT_METRICS = "export.json"
PROBE_PROMPTS = ["Who are you?", "Write one sentence about the sea.", "What is 12 + 30?", "你好，请介绍一下你自己。"]
# The tolerance of the equivalence check (both sides computed in float32). A float32 export
# differs from base + adapter by summation order only: 1e-4 of the largest |logit| leaves a
# wide margin (SmolLM2-135M: 4e-6). A half-precision export also carries the rounding of each
# merged weight; it must stay within twice the error that plain inference in that dtype
# makes anyway (`dtype_noise`: base + adapter run in bfloat16 vs float32; twice, because
# both are maxima of rounding noise). A difference below that is immaterial in that dtype.
# SmolLM2-135M in bfloat16: export 0.42, bfloat16 inference 1.70, largest logit 38.6.
FLOAT32_RELATIVE_TOLERANCE = 1e-4
HALF_PRECISION_NOISE_FACTOR = 2.0
COMPUTE_DTYPE = "float32"


def run_export(cfg: Config, layout: Layout) -> dict:
    """Write `export.export_dir` and `metrics/export.json`; return the export metrics."""
    export_dir = Path(cfg.export.export_dir)
    refuse_non_empty(export_dir, cfg.train.overwrite_output_dir)
    limit = export_size_bytes(cfg.export.export_size)
    base_dir = base_dir_for(cfg, layout)
    source = trained_source(cfg, layout)
    # with `template:` the export carries that template (chat template, EOS, stop ids, Modelfile)
    tokenizer = apply_template(tokenizer_for(cfg, base_dir, source), cfg.data.template)
    vision = is_vision_model(follow_manifest(base_dir))  # probes with pictures, processor files exported
    probes = vision_probes(cfg, follow_manifest(base_dir), tokenizer) if vision else probe_inputs(tokenizer)
    device = device_for(cfg.export.export_device)
    gguf_type = cfg.export.export_gguf
    if gguf_type:  # an architecture the GGUF writer cannot map fails here, before any merge work
        gguf_export.check_architecture(_model_config(source.paths[0] if source.kind == "full" else base_dir),
                                       tokenizer)
    with atomic_dir(export_dir) as tmp:
        model, reference, merge_diff = build_export_model(cfg, base_dir, source, device, probes)
        model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config,
                                                              stop_words(cfg.data.template))
        model = model.to(torch_dtype(cfg.model.dtype))  # the one rounding to the export dtype
        save_sharded(model, tmp, limit)
        tokenizer.save_pretrained(str(tmp))
        if vision:
            copy_processor_files(follow_manifest(base_dir), tmp)
        if gguf_type:  # from the rounded weights, so the GGUF is the export, not the float32 merge
            gguf_export.write_gguf(model, tokenizer, tmp, gguf_type, model.generation_config.eos_token_id)
        del model
        gc.collect()
        source_line = f"./{gguf_export.gguf_name(gguf_type)}" if gguf_type else "."
        text, has_template = modelfile_text(tokenizer, _generation_config(tmp), source_line)
        write_text_atomic(tmp / MODELFILE, text)
        metrics = verify_shards(tmp, limit)
        if gguf_type:
            metrics.update(check_gguf(cfg, tmp, probes, reference))
        noise = dtype_noise(cfg, base_dir, source, device, probes, reference)
        metrics.update(check_equivalence(cfg, tmp, device, probes, reference, merge_diff, noise))
    metrics.update({"export_size_bytes": limit, "merged_adapters": len(source.paths) * (source.kind == "adapters"),
                    "modelfile_template": int(has_template)})
    if cfg.model.quantization_bit and source.kind == "adapters":
        metrics["qlora_gap_max_abs_logit_diff"] = quantized_gap(cfg, base_dir, source, device, probes, reference)
    write_json_atomic(layout.metrics / EXPORT_METRICS, metrics)
    tracker = join_train_run(cfg, source.record_dir)
    if tracker is not None:
        tracker.log_metrics({f"export/{key}": value for key, value in metrics.items()})
    log.info("exported %s (%d shards, max |logit diff| %.3g)", export_dir, metrics["shards"],
             metrics["max_abs_logit_diff"])
    return metrics


def refuse_non_empty(export_dir: Path, overwrite: bool) -> None:
    if export_dir.is_file() or (export_dir.is_dir() and any(export_dir.iterdir()) and not overwrite):
        raise TunepipeError(f"export.export_dir={str(export_dir)!r} already exists and is not empty",
                            hint="choose another export_dir, or set train.overwrite_output_dir: true")


def probe_inputs(tokenizer) -> list[list[int]]:
    """Token ids of the probe prompts, in the chat format when the tokenizer has one."""
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for text in PROBE_PROMPTS]
    return [tokenizer(text)["input_ids"] for text in PROBE_PROMPTS]


def probe_logits(model, probes: list) -> list:
    """Float32 CPU logits of each probe (one forward each: no padding to reason about). A probe is
    token ids, or a vision-language model's forward inputs (export/vision.py)."""
    import torch

    from tunepipe.evaluate.lm_metrics import model_device

    device = model_device(model)
    with torch.inference_mode():
        return [model(**({key: value.to(device) for key, value in ids.items()} if isinstance(ids, dict)
                         else {"input_ids": torch.tensor([ids], device=device)})).logits[0].float().cpu()
                for ids in probes]


def max_abs_diff(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def build_export_model(cfg: Config, base_dir: Path, source: TrainedSource, device: str, probes):
    """(model to save, reference logits, max in-memory merge difference).

    Each adapter is merged on top of the previous merge, and the logits of the model
    with that adapter still unmerged become the reference for the next check.
    """
    if source.kind != "adapters":
        model = load_unmerged(cfg, base_dir, source, device, COMPUTE_DTYPE)
        return model, probe_logits(model, probes), 0.0
    model = load_base(cfg, base_dir, device, quantized=False, dtype=COMPUTE_DTYPE)
    merge_diff = 0.0
    reference = None
    for path in source.paths:
        unmerged = apply_adapters(model, [path])
        reference = probe_logits(unmerged, probes)
        model = unmerged.merge_and_unload()
        merge_diff = max(merge_diff, max_abs_diff(probe_logits(model, probes), reference))
    return model, reference, merge_diff


def load_unmerged(cfg: Config, base_dir: Path, source: TrainedSource, device: str, dtype: str):
    """base + adapters (the last one unmerged), a full fine-tune, or the base, in `dtype`."""
    if source.kind == "full":
        return load_causal_lm(source.paths[0], dtype=dtype, device_map=device,
                              trust_remote_code=cfg.model.trust_remote_code).eval()
    model = load_base(cfg, base_dir, device, quantized=False, dtype=dtype)
    return apply_adapters(model, source.paths) if source.kind == "adapters" else model


def dtype_noise(cfg: Config, base_dir: Path, source: TrainedSource, device: str, probes, reference) -> float:
    """How far ordinary inference in `model.dtype` is from the float32 reference (0 for float32)."""
    if cfg.model.dtype == COMPUTE_DTYPE:
        return 0.0
    model = load_unmerged(cfg, base_dir, source, device, cfg.model.dtype)
    noise = max_abs_diff(probe_logits(model, probes), reference)
    del model
    gc.collect()
    return noise


def tolerance(noise: float, reference: list) -> float:
    scale = max(1.0, max(logits.abs().max().item() for logits in reference))
    return max(FLOAT32_RELATIVE_TOLERANCE * scale, HALF_PRECISION_NOISE_FACTOR * noise)


def check_equivalence(cfg: Config, export_dir: Path, device: str, probes, reference, merge_diff: float,
                      noise: float) -> dict:
    """Reload the written export and compare its logits with base + adapter; fail above tolerance."""
    model = load_causal_lm(export_dir, dtype=COMPUTE_DTYPE, device_map=device).eval()
    diff = max(max_abs_diff(probe_logits(model, probes), reference), merge_diff)
    del model
    gc.collect()
    limit = tolerance(noise, reference)
    if diff > limit:
        raise TunepipeError(
            f"export check failed: the merged model's logits differ from base + adapter by {diff:.4g} "
            f"(tolerance {limit:.4g} for {cfg.model.dtype}); nothing was written to {cfg.export.export_dir}",
            hint="an adapter that does not match this base model, or a bug worth reporting")
    return {"max_abs_logit_diff": diff, "logit_tolerance": limit, "dtype_noise_max_abs_logit_diff": noise,
            "probe_prompts": len(probes), "probe_tokens": sum(probe_length(ids) for ids in probes),
            "probe_images": sum(len(ids["image_grid_thw"]) for ids in probes if isinstance(ids, dict))}


def probe_length(probe) -> int:
    return probe["input_ids"].shape[1] if isinstance(probe, dict) else len(probe)


# GGUF read-back tolerance, relative to the largest |logit| of the probes (at least 1): f32 carries
# summation order only; f16 / bf16 the rounding of every weight; q8_0 an 8-bit step per block of
# 32 weights. Measured max |diff| on the tiny test Llama with a strong random adapter (largest
# |logit| below 1): f32 1.6e-5, f16 1.3e-2, bf16 5.8e-2, q8_0 0.24. The tiny random models of the
# other families (no adapter) at q8_0: Qwen2 0.0077, Qwen3 0.0083, Mistral 0.0064, Gemma 2 0.012,
# Gemma 3 0.026, Phi-3 0.0069 (f32: 0 for each). The demo model (SmolLM2-135M + its identity
# adapter) at q8_0: 1.39 with a largest |logit| of 40.3 (0.034 relative). The limits leave a margin
# over the tiny models, whose random weights make them far noisier than a trained model.
GGUF_RELATIVE_TOLERANCE = {"f32": 1e-4, "f16": 3e-2, "bf16": 1.2e-1, "q8_0": 4e-1}


def check_gguf(cfg: Config, export_dir: Path, probes, reference) -> dict:
    """Read the GGUF back with transformers and compare its logits with base + adapter (float32)."""
    gguf_type = cfg.export.export_gguf
    logits = gguf_export.gguf_logits(export_dir, gguf_type, probes, probe_logits)
    diff = max_abs_diff(logits, reference)
    scale = max(1.0, max(x.abs().max().item() for x in reference))
    limit = GGUF_RELATIVE_TOLERANCE[gguf_type] * scale
    if diff > limit:
        raise TunepipeError(f"GGUF check failed: {gguf_export.gguf_name(gguf_type)} read back gives logits "
                            f"{diff:.4g} from base + adapter (tolerance {limit:.4g}); nothing was written to "
                            f"{cfg.export.export_dir}", hint="a bug worth reporting (architecture, GGUF type)")
    # informational: how often the GGUF picks the export's greedy token, at every probe position and
    # right after each prompt (the first answer token)
    agree = [(x.argmax(-1) == y.argmax(-1)) for x, y in zip(logits, reference, strict=True)]
    return {"gguf_file": gguf_export.gguf_name(gguf_type), "gguf_type": gguf_type,
            "gguf_bytes": (export_dir / gguf_export.gguf_name(gguf_type)).stat().st_size,
            "gguf_max_abs_logit_diff": diff, "gguf_logit_tolerance": limit,
            "gguf_top1_agreement": sum(int(a.sum()) for a in agree) / sum(len(a) for a in agree),
            "gguf_first_token_matches": sum(int(a[-1]) for a in agree)}


def _model_config(directory: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory))


def quantized_gap(cfg: Config, base_dir: Path, source: TrainedSource, device: str, probes, reference) -> float:
    """How far the exported (unquantized) model is from the 4/8-bit model the adapter was trained on.

    Informational: the export is deliberately the full-precision model, so this is the
    quantization error it does not carry, not an export error.
    """
    model = apply_adapters(load_base(cfg, base_dir, device, quantized=True), source.paths, merge_last=False)
    gap = max_abs_diff(probe_logits(model, probes), reference)
    del model
    gc.collect()
    return gap


def _generation_config(export_dir: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(export_dir))
    except OSError:
        return None


def export_command(args) -> int:
    cfg, layout = cli_config(args)
    metrics = run_export(cfg, layout)
    print(f"exported {cfg.export.export_dir}: {metrics['shards']} shard(s), {metrics['total_bytes']} bytes, "
          f"max |logit diff| vs base + adapter {metrics['max_abs_logit_diff']:.3g}")
    return 0

