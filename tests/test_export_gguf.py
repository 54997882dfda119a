"""`export.export_gguf`: a GGUF written with the `gguf` package beside the safetensors, read back by
transformers with logits within the stated tolerance, named by the Modelfile; unmappable
architectures refused before any work."""

from __future__ import annotations

import json

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
    import gguf

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


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_an_unmappable_architecture_is_refused_before_any_work(family, tmp_path, monkeypatch):
    from tests.fixtures.families import build_family_dir
    from tunepipe.export import merge

    base = build_family_dir(tmp_path / family, family)
    monkeypatch.setattr(merge, "build_export_model", lambda *a, **k: pytest.fail("merge work started"))
    cfg = export_config(base, tmp_path / "export", "export.export_gguf=q8_0")
    with pytest.raises(TunepipeError, match=f"cannot write GGUF for model_type '{family}'"):
        run_export(cfg, Layout.at(tmp_path))
    assert not (tmp_path / "export").exists()
