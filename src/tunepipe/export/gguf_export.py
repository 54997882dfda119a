"""`export.export_gguf`: the export as one GGUF file for llama.cpp / Ollama, written with the `gguf` package.

The `gguf` package (llama.cpp's own Python library) provides the writer, the tensor-name map
(`get_tensor_name_map`: HF parameter name -> GGUF tensor name for each architecture), the
quantizers (`gguf.quants.quantize`) and `SpecialVocab` (merges, special token ids, chat
template from the tokenizer files). The glue here: which architectures map, the
hyper-parameter keys, the vocabulary, and one layout change llama.cpp's Llama code expects
(below). 1-D tensors (norms, biases) stay float32, as llama.cpp's converter keeps them.

Llama / Mistral store q_proj and k_proj rows in HF's "rotate half" order; llama.cpp's
rope for these architectures pairs adjacent rows, so their rows are permuted on the way
out (and transformers' GGUF reader permutes them back).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunepipe.errors import TunepipeError

log = logging.getLogger(__name__)

# HF model_type -> (gguf MODEL_ARCH member name, permute q/k rows). Only what the read-back test
# passes: Qwen2 / Qwen3 wrote but failed it (sliding-window layers and Qwen3's head_dim are not
# carried yet), Mistral's sliding window likewise, so they are refused until they pass.
ARCHITECTURES = {"llama": ("LLAMA", True)}
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def gguf_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def check_architecture(config, key: str = "export.export_gguf") -> None:
    """Refuse, before any work, a model whose architecture this exporter cannot map."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TunepipeError(f"{key}: cannot write GGUF for model_type {model_type!r}",
                            hint=f"GGUF export maps {', '.join(sorted(ARCHITECTURES))}; unset {key} "
                                 "and convert with llama.cpp's convert_hf_to_gguf.py")


def write_gguf(model, tokenizer, export_dir: Path, gguf_type: str, stop_ids: list[int]) -> Path:
    """Write `export_dir/model-<type>.gguf` from the float32 model in memory; return its path."""
    import gguf

    config = model.config
    check_architecture(config)
    arch_name, permute = ARCHITECTURES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    path = export_dir / gguf_name(gguf_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    write_hparams(writer, config, getattr(gguf.LlamaFileType, TYPES[gguf_type][1]))
    write_vocab(writer, tokenizer, export_dir, stop_ids)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    qtype = getattr(gguf.GGMLQuantizationType, TYPES[gguf_type][0])
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd for a tied output layer
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunepipeError(f"export.export_gguf: no GGUF name for tensor {hf_name} ({config.model_type})")
        data = tensor.detach().float().cpu().numpy()
        if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = rope_interleave(data, heads)
        add_tensor(writer, gguf, name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rope_interleave(weight, heads: int):
    """Rows of each head from [first halves..., second halves...] to pairs (i, i + half) side by side."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def add_tensor(writer, gguf, name: str, data, qtype) -> None:
    import numpy as np

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or data.shape[-1] % block:
        writer.add_tensor(name, data.astype(np.float32))  # norms, biases, odd shapes: full precision
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)  # byte shape in, element shape derived


def write_hparams(writer, config, file_type) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_rope_freq_base(float(theta or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def write_vocab(writer, tokenizer, export_dir: Path, stop_ids: list[int]) -> None:
    """A byte-level BPE vocabulary ("gpt2" in GGUF terms), merges, special ids, chat template."""
    import gguf

    if not getattr(tokenizer, "is_fast", False) or tokenizer.backend_tokenizer.model.__class__.__name__ != "BPE":
        raise TunepipeError("export.export_gguf: only byte-level BPE tokenizers are written to GGUF here")
    size = len(tokenizer)
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        tokens.append(token)
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(export_dir, load_merges=True, n_vocab=size)
    special.add_to_gguf(writer)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    eos = tokenizer.eos_token_id
    extra = [i for i in stop_ids if i != eos]
    if extra:  # the end-of-turn token llama.cpp stops at besides EOS
        writer.add_eot_token_id(extra[0])


def gguf_logits(export_dir: Path, gguf_type: str, probes, probe_logits) -> list:
    """Probe logits of the GGUF read back by transformers (dequantized to float32)."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(export_dir), gguf_file=gguf_name(gguf_type),
                                                 dtype=torch.float32).eval()
    logits = probe_logits(model, probes)
    del model
    gc.collect()
    return logits
