"""`export_gguf: q8_0` on the demo model (the embedded SmolLM2-135M-Instruct with a LoRA adapter merged):
the GGUF read back meets the stated tolerance on the four chat prompts, the figures land in
metrics/export.json, the Modelfile names the GGUF, and the quantized model picks the export's first
answer token after every prompt."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.adapters import make_adapter
from tests.test_export import export_config
from tunepipe.export.merge import GGUF_RELATIVE_TOLERANCE, run_export
from tunepipe.layout import Layout


@pytest.mark.slow
def test_demo_model_q8_0_gguf_reads_back_within_tolerance(smollm2_base_dir, tmp_path):
    adapter = make_adapter(smollm2_base_dir, tmp_path / "adapter", scale=0.05)
    export_dir = tmp_path / "export"
    cfg = export_config(smollm2_base_dir, export_dir, f"model.adapter_name_or_path={adapter}",
                        "export.export_gguf=q8_0", "export.export_size=1")
    metrics = run_export(cfg, Layout.at(tmp_path))
    written = json.loads((tmp_path / "metrics" / "export.json").read_text())
    assert written == metrics and written["gguf_file"] == "model-q8_0.gguf" and written["gguf_type"] == "q8_0"
    diff, limit = written["gguf_max_abs_logit_diff"], written["gguf_logit_tolerance"]
    assert 0 < diff <= limit and limit / GGUF_RELATIVE_TOLERANCE["q8_0"] > 10  # relative to logits of ~40
    assert written["gguf_first_token_matches"] == written["probe_prompts"] == 4
    assert written["gguf_top1_agreement"] >= 0.9
    assert written["gguf_bytes"] < 0.3 * written["total_bytes"]  # 8.5 bits a weight against float32's 32
    assert "FROM ./model-q8_0.gguf" in (export_dir / "Modelfile").read_text()
