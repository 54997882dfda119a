"""`export.export_gguf` for SentencePiece tokenizers (Mistral, Gemma 2/3, Phi-3 as released): a tiny
SentencePiece model trained here with byte fallback, wrapped as transformers' Llama / Gemma
tokenizer, exported beside the family's tiny model. The GGUF's tokenizer, rebuilt by transformers
from the file alone (pieces, scores, types), must encode as the original does, byte fallback
included, and the logits must meet the f32 tolerance."""

from __future__ import annotations

import io
import shutil

import gguf
import pytest

from tests.test_export_gguf import READBACK_FAMILIES
from tunepipe.export.merge import GGUF_RELATIVE_TOLERANCE

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "tiny", "models", "learn", "to",
         "answer", "questions", "about", "weather", "music", "rivers", "and", "mountains", "with", "short",
         "friendly", "sentences"]
# a few hundred deterministic lines: enough merges for whole words, few enough to train in ~50 ms
LINES = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 9)) + f" {i % 50}."
         for i in range(400)]
# ASCII words, a character never seen in training (-> byte pieces), CJK and an emoji (-> bytes),
# a digit run and the turn markers, which must stay whole
TEXTS = ["the quick brown fox", "Weather über Zürich: 日本語 🙂 42!", "rivers\nand mountains"]

STYLES = {  # the special pieces and leading-space rule of the released tokenizer.model files
    "llama": {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "add_dummy_prefix": True,
              "user_defined_symbols": ["<|im_start|>", "<|im_end|>"]},
    "gemma": {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": "<pad>", "eos_piece": "<eos>",
              "bos_piece": "<bos>", "add_dummy_prefix": False,
              "user_defined_symbols": ["<start_of_turn>", "<end_of_turn>"]},
}
TEMPLATES = {
    "llama": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "gemma": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
             "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
}
FAMILY_STYLE = {"mistral": "llama", "phi3": "llama", "gemma2": "gemma", "gemma3": "gemma"}
TURN_END = {"llama": "<|im_end|>", "gemma": "<end_of_turn>"}


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    """One trained tokenizer.model per style, in its own directory."""
    import sentencepiece

    dirs = {}
    for style, options in STYLES.items():
        buffer = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(LINES), model_writer=buffer, model_type="bpe", vocab_size=420,
            byte_fallback=True, character_coverage=1.0, minloglevel=2, num_threads=1,
            # as Llama's / Gemma's: text kept as typed (newlines, runs of spaces), no NFKC
            normalization_rule_name="identity", remove_extra_whitespaces=False, **options)
        dirs[style] = tmp_path_factory.mktemp(f"spm-{style}")
        (dirs[style] / "tokenizer.model").write_bytes(buffer.getvalue())
    return dirs


def spm_tokenizer(style: str, directory):
    from transformers import GemmaTokenizer, LlamaTokenizer

    # add_bos_token as the released tokenizer_config.json files set it
    tokenizer = (GemmaTokenizer if style == "gemma" else LlamaTokenizer).from_pretrained(str(directory),
                                                                                       add_bos_token=True)
    tokenizer.chat_template = TEMPLATES[style]
    return tokenizer


def test_the_test_tokenizers_are_the_sentencepiece_models(spm_files):
    """The premise: transformers' tokenizers built from the trained files encode as sentencepiece does,
    and the texts exercise byte fallback."""
    import sentencepiece

    for style, directory in spm_files.items():
        processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        tokenizer = spm_tokenizer(style, directory)
        for text in TEXTS:
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text)
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(TEXTS[1])["input_ids"])
        assert "<0xC3>" in pieces and "<0xF0>" in pieces  # ü and the emoji fell back to bytes


@pytest.mark.parametrize("family", sorted(FAMILY_STYLE))
def test_sentencepiece_vocabulary_reads_back_as_the_same_tokenizer(family, spm_files, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from tests.fixtures.families import family_config, model_class
    from tunepipe.export.gguf_export import check_architecture, gguf_logits, write_gguf
    from tunepipe.export.merge import max_abs_diff, probe_inputs, probe_logits

    style = FAMILY_STYLE[family]
    tokenizer = spm_tokenizer(style, spm_files[style])
    tokenizer.save_pretrained(tmp_path)  # as the export does: tokenizer.json, no tokenizer.model
    torch.manual_seed(0)
    model = model_class(family)(family_config(family, tokenizer, **READBACK_FAMILIES[family])).eval()
    check_architecture(model.config, tokenizer)  # no longer refused
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END[style])
    path = write_gguf(model, tokenizer, tmp_path, "f32", [tokenizer.eos_token_id, turn_end])

    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is (style == "llama")
    assert fields["tokenizer.ggml.eot_token_id"].contents() == turn_end
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[turn_end] == gguf.TokenType.USER_DEFINED

    read_back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[1]}], tokenize=False,
                                         add_generation_prompt=True)
    for text in [*TEXTS, chat]:
        assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    ids = {name: fields[f"tokenizer.ggml.{name}_token_id"].contents() for name in ("bos", "eos", "unknown")}
    assert ids == {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unknown": tokenizer.unk_token_id}
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True  # both styles start with BOS, as released

    probes = probe_inputs(tokenizer)
    diff = max_abs_diff(gguf_logits(tmp_path, "f32", probes, probe_logits), probe_logits(model, probes))
    assert diff <= GGUF_RELATIVE_TOLERANCE["f32"]


def test_a_tokenizer_model_that_does_not_match_the_tokenizer_is_refused(spm_files, tmp_path):
    """The GGUF's pieces come from tokenizer.model: one from another model is refused before any work."""
    from transformers import MistralConfig

    from tunepipe.errors import TunepipeError
    from tunepipe.export.gguf_export import check_architecture

    tokenizer = spm_tokenizer("llama", spm_files["llama"])
    shutil.copyfile(spm_files["gemma"] / "tokenizer.model", tmp_path / "tokenizer.model")
    tokenizer.vocab_file = str(tmp_path / "tokenizer.model")
    with pytest.raises(TunepipeError, match="does not match the tokenizer's vocabulary"):
        check_architecture(MistralConfig(sliding_window=None), tokenizer)


def test_export_of_a_released_style_mistral_checkpoint_writes_a_sentencepiece_gguf(spm_files, tmp_path):
    """End to end through `run_export`: a base dir as Mistral releases it (tokenizer.json beside
    tokenizer.model) exports a q8_0 GGUF with the SentencePiece vocabulary, the export carries the
    tokenizer.model, the Modelfile names the GGUF and the read-back meets the q8_0 tolerance."""
    import json

    import torch

    from tests.fixtures.families import family_config, model_class
    from tests.test_export import export_config
    from tunepipe.export.merge import run_export
    from tunepipe.layout import Layout

    base = tmp_path / "base"
    tokenizer = spm_tokenizer("llama", spm_files["llama"])
    torch.manual_seed(0)
    model_class("mistral")(family_config("mistral", tokenizer, sliding_window=None)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    shutil.copyfile(spm_files["llama"] / "tokenizer.model", base / "tokenizer.model")
    export_dir = tmp_path / "export"
    metrics = run_export(export_config(base, export_dir, "export.export_gguf=q8_0"), Layout.at(tmp_path))

    assert 0 < metrics["gguf_max_abs_logit_diff"] <= metrics["gguf_logit_tolerance"]
    assert json.loads((tmp_path / "metrics" / "export.json").read_text())["gguf_file"] == "model-q8_0.gguf"
    assert "FROM ./model-q8_0.gguf" in (export_dir / "Modelfile").read_text()
    assert (export_dir / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    fields = gguf.GGUFReader(str(export_dir / "model-q8_0.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.scores"].contents()[:3] == [0.0, 0.0, 0.0]  # <unk> <s> </s>
    assert len(set(fields["tokenizer.ggml.scores"].contents())) > 100  # the merge scores, not a constant
