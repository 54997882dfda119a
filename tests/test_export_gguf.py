"""`export.export_gguf`: a GGUF written with the `gguf` package beside the safetensors, read back by
transformers with logits within the stated tolerance, named by the Modelfile; unmappable
architectures refused before any work."""

from __future__ import annotations

import json

import gguf
import pytest

from tests.fixtures.adapters import make_adapter
from tests.test_export import export_config
from tunepipe.errors import TunepipeError
from tunepipe.export.merge import GGUF_RELATIVE_TOLERANCE, run_export
from tunepipe.layout import Layout


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "adapter", scale=1.0)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_reads_back_within_tolerance(gguf_type, tiny_model_dir, adapter_dir, tmp_path):
    export_dir = tmp_path / "export"
    cfg = export_config(tiny_model_dir, export_dir, f"model.adapter_name_or_path={adapter_dir}",
                        f"export.export_gguf={gguf_type}")
    metrics = run_export(cfg, Layout.at(tmp_path))
    path = export_dir / f"model-{gguf_type}.gguf"
    assert path.is_file() and metrics["gguf_file"] == path.name
    assert 0 < metrics["gguf_max_abs_logit_diff"] <= metrics["gguf_logit_tolerance"]
    written = json.loads((tmp_path / "metrics" / "export.json").read_text())
    assert written["gguf_max_abs_logit_diff"] == metrics["gguf_max_abs_logit_diff"]
    assert f"FROM ./model-{gguf_type}.gguf" in (export_dir / "Modelfile").read_text()
    reader = gguf.GGUFReader(str(path))
    fields = {name: reader.fields[name] for name in reader.fields}
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "<|im_start|>" in template
    eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert eos == 2  # <|im_end|> in the tiny tokenizer: generation stops at the end of the turn
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert ("Q8_0" if gguf_type == "q8_0" else "F16") in kinds
    assert GGUF_RELATIVE_TOLERANCE[gguf_type] > 0


# The families' tiny models as the real checkpoints llama.cpp runs: Qwen2 / Qwen3 / Mistral (v0.2 on) /
# Phi-3.5 attend without a window inside their context; Gemma 3 has five sliding layers per full one.
READBACK_FAMILIES = {
    "qwen2": {"use_sliding_window": False, "sliding_window": None},
    "qwen3": {"use_sliding_window": False, "sliding_window": None},
    "mistral": {"sliding_window": None},
    "phi3": {"sliding_window": None},
    "gemma2": {},  # windowed every other layer, both softcaps, as llama.cpp's gemma2
    "gemma3": {"num_hidden_layers": 6, "layer_types": None},
}


@pytest.mark.parametrize("family", sorted(READBACK_FAMILIES))
def test_every_listed_family_reads_back_at_float32_precision(family, tmp_path):
    """The writer and the read-back alone (the export around them is `run_export`'s, tested on Llama
    above): f32 leaves nothing but summation order, so a wrong tensor name, permutation, norm offset
    or hyper-parameter (Gemma's softcaps, Qwen3's head_dim) lands far above the 1e-4 tolerance."""
    import torch

    from tests.fixtures.families import build_tokenizer, family_config, model_class
    from tunepipe.export.gguf_export import gguf_logits, write_gguf
    from tunepipe.export.merge import max_abs_diff, probe_inputs, probe_logits

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = model_class(family)(family_config(family, tokenizer, **READBACK_FAMILIES[family])).eval()
    probes = probe_inputs(tokenizer)
    assert max(len(ids) for ids in probes) > 16  # past every window: a lost window would show
    path = write_gguf(model, tokenizer, tmp_path, "f32", [tokenizer.eos_token_id])
    diff = max_abs_diff(gguf_logits(tmp_path, "f32", probes, probe_logits), probe_logits(model, probes))
    assert diff <= GGUF_RELATIVE_TOLERANCE["f32"]  # logits of these models stay below 1
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == READBACK_ARCH.get(family, family)
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()


READBACK_ARCH = {"mistral": "llama"}  # llama.cpp runs Mistral as a Llama


@pytest.mark.parametrize(("family", "overrides", "message"), [
    ("gemma", {}, "cannot write GGUF for model_type 'gemma'"),
    ("granite", {}, "cannot write GGUF for model_type 'granite'"),
    ("qwen2", {}, "llama.cpp's qwen2 runs no sliding window"),
    ("gemma3", {}, "llama.cpp's gemma3 has 5 sliding layers per full one"),
    ("gemma2", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar is 64"),
])
def test_an_unmappable_architecture_is_refused_before_any_work(family, overrides, message, tmp_path, monkeypatch):
    from tests.fixtures.families import build_family_dir
    from tunepipe.export import merge

    base = build_family_dir(tmp_path / family, family, overrides=overrides)
    monkeypatch.setattr(merge, "build_export_model", lambda *a, **k: pytest.fail("merge work started"))
    cfg = export_config(base, tmp_path / "export", "export.export_gguf=q8_0")
    with pytest.raises(TunepipeError, match=message):
        run_export(cfg, Layout.at(tmp_path))
    assert not (tmp_path / "export").exists()


def test_a_sentencepiece_style_tokenizer_without_its_tokenizer_model_is_refused(tmp_path):
    """SentencePiece-style vocabularies need the piece scores llama.cpp tokenizes by, which only
    tokenizer.model holds; without it they are refused, not written with constant scores."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from tunepipe.export.gguf_export import check_architecture

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "▁a": 5}
    backend = Tokenizer(models.BPE(vocab, [("▁", "a")], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(TunepipeError, match="SentencePiece ones loaded from their tokenizer.model"):
        check_architecture(LlamaConfig(), tokenizer)
