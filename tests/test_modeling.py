"""The base_model stage: real GGUF conversion, HF-dir manifests, loaders following them."""

from __future__ import annotations

import json

import pytest

from tunepipe.config import ModelConfig
from tunepipe.errors import TunepipeError
from tunepipe.models.base import (
    MANIFEST,
    follow_manifest,
    load_causal_lm,
    load_tokenizer,
    prepare_base_model,
    resolve_source,
)


def greedy_answer(base_dir, question: str, max_new_tokens: int = 24) -> str:
    tokenizer = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_embedded_smollm2_converts_and_knows_paris(smollm2_base_dir):
    files = {p.name for p in smollm2_base_dir.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert "generation_config.json" in files and "tokenizer.json" in files
    config = json.loads((smollm2_base_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert load_tokenizer(smollm2_base_dir).chat_template
    assert "Paris" in greedy_answer(smollm2_base_dir, "What is the capital of France?")


def test_hf_dir_gets_a_manifest_not_a_copy(tiny_model_dir, tmp_path):
    out = prepare_base_model(ModelConfig(model_name_or_path=str(tiny_model_dir)), tmp_path / "base")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["path"] == str(tiny_model_dir.resolve()) and len(manifest["sha256"]) == 64
    assert follow_manifest(out) == tiny_model_dir.resolve()
    model = load_causal_lm(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert load_tokenizer(out).chat_template


def test_dtype_is_applied(tiny_model_dir, tmp_path):
    out = prepare_base_model(ModelConfig(model_name_or_path=str(tiny_model_dir), dtype="bfloat16"),
                             tmp_path / "base")
    import torch

    assert load_causal_lm(out).dtype == torch.bfloat16


def test_manifest_pointing_at_a_removed_dir_is_a_clear_error(tiny_model_dir, tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"path": str(tmp_path / "gone")}))
    with pytest.raises(TunepipeError, match="holds no model"):
        follow_manifest(out)


@pytest.mark.parametrize("name, pattern", [
    ("no-such-model", "not a builtin alias"),
    ("/nowhere/model.gguf", "GGUF file not found"),
])
def test_bad_model_names(name, pattern):
    with pytest.raises(TunepipeError, match=pattern):
        resolve_source(name)


def test_failed_preparation_leaves_nothing(tmp_path):
    with pytest.raises(TunepipeError):
        prepare_base_model(ModelConfig(model_name_or_path="no-such-model"), tmp_path / "base")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method, needs", [
    ("gptq", "packages optimum and gptqmodel"), ("awq", "package gptqmodel"), ("aqlm", "package aqlm")])
def test_a_prequantized_checkpoint_without_its_package_is_refused_before_any_work(tmp_path, monkeypatch, method,
                                                                                  needs):
    import importlib.util

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "quantization_config": {"quant_method": method, "bits": 4}}))
    modules = {"gptq": ["optimum", "gptqmodel"], "awq": ["gptqmodel"], "aqlm": ["aqlm"]}[method]
    find_spec = importlib.util.find_spec  # make setup installs gptqmodel and optimum: hide them here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else find_spec(name, *a))
    with pytest.raises(TunepipeError, match=rf"is a {method.upper()}-quantized checkpoint: it needs {needs} .*"
                                            rf"not installed: {', '.join(modules)}"):
        resolve_source(str(model))
    # bitsandbytes checkpoints (and unquantized ones) load as before
    (model / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "quantization_config": {"quant_method": "bitsandbytes"}}))
    assert resolve_source(str(model)).path == model.resolve()
