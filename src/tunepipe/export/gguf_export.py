"""`export.export_gguf`: the export as one GGUF file for llama.cpp / Ollama, written with the `gguf` package.

The `gguf` package (llama.cpp's own Python library) provides the writer, the tensor-name map
(`get_tensor_name_map`: HF parameter name -> GGUF tensor name for each architecture), the
quantizers (`gguf.quants.quantize`), the vocabulary readers (`gguf.vocab`) and `SpecialVocab`
(merges, special token ids, chat template from the tokenizer files). The glue here: the
hyper-parameter keys and the layout / value changes llama.cpp expects, per family in
`gguf_families`. 1-D tensors (norms, biases) stay float32, as llama.cpp's converter keeps them.

Llama / Mistral store q_proj and k_proj rows in HF's "rotate half" order; llama.cpp's
rope for these architectures pairs adjacent rows, so their rows are permuted on the way
out (and transformers' GGUF reader permutes them back). The other families use the
"neox" rope, HF's own order.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunepipe.errors import TunepipeError
from tunepipe.export.gguf_families import family_for, readback_overrides, rope_theta, rotary_dims
from tunepipe.export.gguf_spm import check_sentencepiece, sentencepiece_file, write_sentencepiece_vocab

log = logging.getLogger(__name__)

TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# llama.cpp picks its pre-tokenizer regex by this name; Qwen's differs from GPT-2's in digits and
# CJK runs. Families not listed get llama.cpp's default.
TOKENIZER_PRE = {"qwen2": "qwen2", "qwen3": "qwen2"}


def gguf_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def check_architecture(config, tokenizer=None, key: str = "export.export_gguf") -> None:
    """Refuse, before any work, a model whose architecture or tokenizer this exporter cannot map."""
    if hasattr(config, "vision_config"):
        raise TunepipeError(f"{key}: {config.model_type} is a vision-language model; llama.cpp runs one from two "
                            "GGUF files, the language model and the vision tower + projector (its mmproj file), "
                            "and this exporter writes only language models",
                            hint=f"unset {key}, then convert the safetensors export with llama.cpp's "
                                 "convert_hf_to_gguf.py, once as it is and once with --mmproj")
    family_for(config, key)
    if tokenizer is None or _byte_level(tokenizer):
        return
    if sentencepiece_file(tokenizer) is not None:
        check_sentencepiece(tokenizer, key)
        return
    # Any other tokenizer (WordPiece, Unigram from tokenizer.json only, a SentencePiece-style BPE
    # without its tokenizer.model): llama.cpp's tokenizer for it needs data this exporter cannot
    # derive (the merge scores), so it is refused rather than written with one that splits text differently.
    raise TunepipeError(f"{key}: cannot write GGUF for this {config.model_type} model's tokenizer: GGUF is "
                        "written for byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen) and for SentencePiece "
                        "ones loaded from their tokenizer.model (Llama 2, Mistral, Gemma, Phi-3)",
                        hint=f"put the model's tokenizer.model beside its tokenizer.json, or unset {key} and "
                             "convert the export with llama.cpp's convert_hf_to_gguf.py")


def write_gguf(model, tokenizer, export_dir: Path, gguf_type: str, stop_ids: list[int]) -> Path:
    """Write `export_dir/model-<type>.gguf` from the model in memory; return its path."""
    import gguf

    config = model.config
    check_architecture(config, tokenizer)
    family = family_for(config)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    path = export_dir / gguf_name(gguf_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    write_hparams(writer, config, getattr(gguf.LlamaFileType, TYPES[gguf_type][1]))
    family.extra_hparams(writer, config)
    if _byte_level(tokenizer):
        write_vocab(writer, tokenizer, export_dir, TOKENIZER_PRE.get(config.model_type, "default"))
    else:  # check_architecture let through only SentencePiece ones besides
        write_sentencepiece_vocab(writer, tokenizer, export_dir, config.vocab_size)
    write_eot(writer, tokenizer, stop_ids)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    qtype = getattr(gguf.GGMLQuantizationType, TYPES[gguf_type][0])
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd for a tied output layer
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunepipeError(f"export.export_gguf: no GGUF name for tensor {hf_name} ({config.model_type})")
        data = tensor.detach().float().cpu().numpy()
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = rope_interleave(data, heads)
        if family.norm_offset and hf_name.endswith("norm.weight"):
            data = data + family.norm_offset
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
    writer.add_rope_dimension_count(rotary_dims(config, head_dim))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def write_vocab(writer, tokenizer, export_dir: Path, pre: str) -> None:
    """The byte-level BPE vocabulary ("gpt2" in GGUF terms), merges, special ids and chat template."""
    import gguf

    tokens, scores, types = _byte_level_tokens(tokenizer, gguf)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    special = gguf.SpecialVocab(export_dir, load_merges=True, n_vocab=len(tokenizer))
    special.add_to_gguf(writer)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_eot(writer, tokenizer, stop_ids: list[int]) -> None:
    """The end-of-turn token llama.cpp stops at besides EOS."""
    extra = [i for i in stop_ids if i != tokenizer.eos_token_id]
    if extra:
        writer.add_eot_token_id(extra[0])


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and backend.model.__class__.__name__ == "BPE" and \
        backend.decoder.__class__.__name__ == "ByteLevel"


def _byte_level_tokens(tokenizer, gguf):
    """Tokens in id order; added tokens typed CONTROL (special) or USER_DEFINED, as llama.cpp expects."""
    added = tokenizer.added_tokens_decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
             if index in added else gguf.TokenType.NORMAL for index in range(len(tokens))]
    return tokens, [0.0] * len(tokens), types


def gguf_metadata(path: Path) -> dict:
    """The GGUF's scalar and string metadata (arrays such as the vocabulary left out)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.") and field.types and field.types[0] != gguf.GGUFValueType.ARRAY}


def readback_model(export_dir: Path, gguf_type: str):
    """The GGUF loaded by transformers (dequantized to float32), configured as llama.cpp reads the file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = gguf_name(gguf_type)
    config = AutoConfig.from_pretrained(str(export_dir), gguf_file=name)
    for key, value in readback_overrides(gguf_metadata(export_dir / name)).items():
        if key == "rope_scaling":  # Gemma 3's linear scaling of the full-attention rope
            config.rope_parameters["full_attention"].update(value)
        else:
            setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(str(export_dir), gguf_file=name, config=config,
                                                dtype=torch.float32).eval()


def gguf_logits(export_dir: Path, gguf_type: str, probes, probe_logits) -> list:
    """Probe logits of the GGUF read back (see `readback_model`)."""
    import gc

    model = readback_model(export_dir, gguf_type)
    logits = probe_logits(model, probes)
    del model
    gc.collect()
    return logits
