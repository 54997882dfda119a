"""SentencePiece vocabularies (Llama 2, Mistral v0.1-v0.3, Gemma 2/3, Phi-3) as llama.cpp's "llama" tokenizer.

llama.cpp tokenizes these models with its own SentencePiece-BPE: it merges the adjacent pair whose
merged piece has the best score, so the GGUF needs every piece's score and type as the
`tokenizer.model` holds them (a tokenizer.json's merge list has no scores). The `gguf` package's
`SentencePieceVocab` reads them through the `sentencepiece` package; the glue here adds what
it leaves out and llama.cpp's converter adds too: the tokenizer's added tokens typed CONTROL
(special) or USER_DEFINED (matched whole, e.g. `<|im_start|>`), padding rows up to the
embedding size as UNUSED `[PAD<id>]` pieces, and whether text gets a leading "▁" (Llama / Mistral /
Phi-3 yes, Gemma no), read from the model's behaviour rather than from its family.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunepipe.errors import TunepipeError

SPM_FILE = "tokenizer.model"
ADDED_TOKEN_SCORE = -1000.0  # llama.cpp's converter: added and padding pieces never win a merge


def sentencepiece_file(tokenizer) -> Path | None:
    """The `tokenizer.model` this tokenizer was loaded from, if it is a SentencePiece one."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and Path(vocab_file).name == SPM_FILE and Path(vocab_file).is_file():
        return Path(vocab_file)
    return None


def check_sentencepiece(tokenizer, key: str) -> None:
    """Refuse, before any work, a `tokenizer.model` that does not spell the tokenizer's vocabulary."""
    from sentencepiece import SentencePieceProcessor

    path = sentencepiece_file(tokenizer)
    processor = SentencePieceProcessor(model_file=str(path))
    pieces = [processor.IdToPiece(index) for index in range(processor.vocab_size())]
    if len(tokenizer) < len(pieces) or tokenizer.convert_ids_to_tokens(list(range(len(pieces)))) != pieces:
        raise TunepipeError(f"{key}: {path} does not match the tokenizer's vocabulary (tokenizer.json)",
                            hint="the GGUF takes its pieces and scores from tokenizer.model; use the pair "
                                 "the model was released with")


def write_sentencepiece_vocab(writer, tokenizer, export_dir: Path, n_vocab: int) -> None:
    """Pieces, scores, types, the leading-space rule and the special ids/flags/chat template."""
    import gguf

    model_file = export_dir / SPM_FILE
    if not model_file.exists():  # the export carries it, as the HF checkpoint did (llama.cpp's converter reads it)
        shutil.copyfile(sentencepiece_file(tokenizer), model_file)
    vocab = gguf.SentencePieceVocab(export_dir)
    tokens, scores, types = (list(column) for column in zip(*vocab.sentencepiece_tokens()))
    _add_tokenizer_tokens(tokenizer, tokens, scores, types, gguf)
    for index in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(ADDED_TOKEN_SCORE)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    pieces = vocab.sentencepiece_tokenizer.EncodeAsPieces("a")
    writer.add_add_space_prefix(pieces[0].startswith("\u2581"))  # SentencePiece's add_dummy_prefix
    special = gguf.SpecialVocab(export_dir, load_merges=False, n_vocab=len(tokens))
    # what the tokenizer does, not what its config files spell (transformers 5 may leave add_bos_token out)
    encoded = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and encoded[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and encoded[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_tokenizer_tokens(tokenizer, tokens: list, scores: list, types: list, gguf) -> None:
    """Type the tokenizer's added tokens so llama.cpp matches them whole; append those past the
    SentencePiece vocabulary (ids must follow on)."""
    base = len(tokens)
    for index, added in sorted(tokenizer.added_tokens_decoder.items()):
        kind = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        if index < base:
            if types[index] == gguf.TokenType.NORMAL:  # a user-defined symbol; UNKNOWN / CONTROL / BYTE stay
                types[index] = kind
            continue
        if index != len(tokens):
            raise TunepipeError(f"export.export_gguf: added token {added.content!r} has id {index}, but the "
                                f"vocabulary ends at {len(tokens) - 1}: GGUF token ids must follow on")
        tokens.append(added.content.encode())
        scores.append(ADDED_TOKEN_SCORE)
        types.append(kind)
