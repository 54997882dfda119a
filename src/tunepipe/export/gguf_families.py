"""What each model family needs to become a GGUF llama.cpp runs as transformers did.

One `GgufFamily` per HF `model_type`: the `gguf` package's architecture (whose tensor-name
map names the tensors), the two value changes llama.cpp's converter makes (Llama's q/k row
order for its rope, Gemma's `1 + w` norms stored as `w + 1`), the hyper-parameters
beyond the common ones, and `refusal`: what llama.cpp's implementation of that
architecture cannot express for this config (checked before any export work). The facts
about llama.cpp's side come from its hparams loader (llama-model.cpp, `load_hparams`):
llama / qwen2 / qwen3 read no sliding window, phi3 reads one and disables it, gemma2 reads
window + softcaps and alternates sliding / full layers, gemma3 hard-codes five sliding
layers per full one and a local rope base of 10000, and both Gemmas scale attention by
1/sqrt(head_dim) (the 27B Gemma 2: 1/sqrt(hidden / heads)).

`readback_overrides` is the reverse for the read-back check: transformers' GGUF loader
maps only some metadata keys to the config; what llama.cpp reads from (or fixes for) the
file besides those is set here from the file, so the reloaded model computes what
llama.cpp would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tunepipe.errors import TunepipeError

GEMMA3_SLIDING_PER_FULL = 6  # llama.cpp: set_swa_pattern(6)
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp: rope_freq_base_train_swa
GEMMA2_27B_LAYERS = 46  # llama.cpp's LLM_TYPE_27B for gemma2, whose attention scale differs


@dataclass(frozen=True)
class GgufFamily:
    arch: str  # gguf.MODEL_ARCH member
    permute_qk: bool = False  # rows of q/k to llama.cpp's interleaved rope order
    norm_offset: float = 0.0  # added to every norm weight (Gemma's (1 + w) * x)
    extra_hparams: Callable = field(default=lambda writer, config: None)
    refusal: Callable = field(default=lambda config: None)  # why this config cannot map, or None


def _windowed_layers(config) -> bool:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return "sliding_attention" in types
    return getattr(config, "sliding_window", None) is not None


def _no_window(arch: str):
    def refusal(config):
        window = getattr(config, "sliding_window", None)
        if _windowed_layers(config) and window is not None and window < config.max_position_embeddings:
            return (f"llama.cpp's {arch} runs no sliding window, and this model attends through one of "
                    f"{window} tokens (sliding_window) on some layers: past {window} tokens llama.cpp's answers "
                    "would differ; set sliding_window: null (and use_sliding_window: false) in the model's "
                    "config.json to accept that")
        return None
    return refusal


def _gemma_scale_refusal(config):
    head_dim = config.head_dim
    expected = (config.hidden_size // config.num_attention_heads
                if config.num_hidden_layers == GEMMA2_27B_LAYERS and config.model_type == "gemma2" else head_dim)
    if config.query_pre_attn_scalar != expected:
        return (f"query_pre_attn_scalar is {config.query_pre_attn_scalar}, but llama.cpp scales this model's "
                f"attention by 1/sqrt({expected})")
    return None


def _gemma2_hparams(writer, config) -> None:
    writer.add_sliding_window(config.sliding_window)
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _gemma2_refusal(config):
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
    if list(config.layer_types) != alternating:
        return "llama.cpp's gemma2 alternates sliding and full attention layers, starting with a sliding one"
    return _gemma_scale_refusal(config)


def _gemma3_hparams(writer, config) -> None:
    import gguf

    writer.add_sliding_window(config.sliding_window)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    full = _rope(config, "full_attention")
    if full.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))


def _gemma3_refusal(config):
    pattern = ["full_attention" if (i + 1) % GEMMA3_SLIDING_PER_FULL == 0 else "sliding_attention"
               for i in range(config.num_hidden_layers)]
    if list(config.layer_types) != pattern:
        return (f"llama.cpp's gemma3 has {GEMMA3_SLIDING_PER_FULL - 1} sliding layers per full one; "
                f"this model's layer_types are {list(config.layer_types)}")
    local = _rope(config, "sliding_attention")
    if float(local.get("rope_theta", GEMMA3_LOCAL_ROPE_BASE)) != GEMMA3_LOCAL_ROPE_BASE or \
            local.get("rope_type", "default") != "default":
        return f"llama.cpp's gemma3 uses an unscaled local rope base of {GEMMA3_LOCAL_ROPE_BASE:g}"
    if _rope(config, "full_attention").get("rope_type", "default") not in ("default", "linear"):
        return "llama.cpp's gemma3 takes a default or linear rope scaling on its full attention layers"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "llama.cpp's gemma3 has no attention-logit softcap"
    return _gemma_scale_refusal(config)


def _rope(config, layer_type: str | None = None) -> dict:
    """The rope parameters as transformers 5 stores them (per layer type for Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in rope:
        return rope[layer_type]
    return rope


def _plain_rope_refusal(config):
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type != "default":
        return f"rope_type {rope_type!r} is not written to GGUF here"
    return None


def _both(*checks):
    def refusal(config):
        return next((reason for check in checks if (reason := check(config))), None)
    return refusal


FAMILIES = {
    "llama": GgufFamily("LLAMA", permute_qk=True, refusal=_plain_rope_refusal),
    # llama.cpp's converter writes Mistral (v0.2 on: no sliding window) as a llama
    "mistral": GgufFamily("LLAMA", permute_qk=True, refusal=_both(_no_window("llama"), _plain_rope_refusal)),
    "qwen2": GgufFamily("QWEN2", refusal=_both(_no_window("qwen2"), _plain_rope_refusal)),
    "qwen3": GgufFamily("QWEN3", refusal=_both(_no_window("qwen3"), _plain_rope_refusal)),
    "phi3": GgufFamily("PHI3", refusal=_both(_no_window("phi3"), _plain_rope_refusal)),
    "gemma2": GgufFamily("GEMMA2", norm_offset=1.0, extra_hparams=_gemma2_hparams,
                         refusal=_both(_gemma2_refusal, _plain_rope_refusal)),
    "gemma3_text": GgufFamily("GEMMA3", norm_offset=1.0, extra_hparams=_gemma3_hparams, refusal=_gemma3_refusal),
}


def family_for(config, key: str = "export.export_gguf") -> GgufFamily:
    """The family of `config`; a clear error, before any work, for one this exporter cannot map."""
    model_type = getattr(config, "model_type", None)
    hint = f"GGUF export maps {', '.join(sorted(FAMILIES))}; unset {key}, or convert with llama.cpp's " \
           "convert_hf_to_gguf.py"
    if model_type not in FAMILIES:
        raise TunepipeError(f"{key}: cannot write GGUF for model_type {model_type!r}", hint=hint)
    family = FAMILIES[model_type]
    reason = family.refusal(config)
    if reason:
        raise TunepipeError(f"{key}: cannot write GGUF for model_type {model_type!r}: {reason}", hint=hint)
    return family


def rope_theta(config) -> float:
    rope = _rope(config, "full_attention")
    return float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def rotary_dims(config, head_dim: int) -> int:
    factor = _rope(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim * factor)


def readback_overrides(metadata: dict) -> dict:
    """Config values llama.cpp takes from (or fixes for) a GGUF that transformers' loader does not map."""
    arch = metadata["general.architecture"]
    key = lambda name, default=None: metadata.get(f"{arch}.{name}", default)
    # a file without a padding id (Llama-style SentencePiece) must not keep a config default such as
    # Phi-3's 32000, past a smaller vocabulary; llama.cpp never pads
    overrides = {"pad_token_id": metadata.get("tokenizer.ggml.padding_token_id")}
    if key("attention.key_length") is not None:
        overrides["head_dim"] = key("attention.key_length")
    if arch in ("gemma2", "gemma3"):
        hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
        is_27b = arch == "gemma2" and layers == GEMMA2_27B_LAYERS
        overrides["query_pre_attn_scalar"] = hidden // heads if is_27b else overrides["head_dim"]
        overrides["final_logit_softcapping"] = key("final_logit_softcapping")
    if arch == "gemma2":
        overrides["attn_logit_softcapping"] = key("attn_logit_softcapping")
    if arch == "gemma3" and key("rope.scaling.type") == "linear":
        overrides["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    return overrides
