"""Which weights evaluate / export / chat load: adapter dirs, train output_dirs, full fine-tunes."""

from __future__ import annotations

import pytest

from tests.fixtures.adapters import make_adapter
from tunepipe.config import Config, ModelConfig
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import resolve_source
from tunepipe.models.trained import adapter_dir, trained_source


def test_an_adapter_dir_is_used_as_it_is(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    assert adapter_dir(str(adapter)) == adapter


def test_a_train_output_dir_resolves_to_its_adapter(tiny_model_dir, tmp_path):
    run = tmp_path / "saves" / "lora" / "sft"
    adapter = make_adapter(tiny_model_dir, Layout.at(run).adapter)
    cfg = Config(model=ModelConfig(adapter_name_or_path=f"{run},{tmp_path / 'saves' / 'lora' / 'sft'}"))
    source = trained_source(cfg, Layout.at(tmp_path / "elsewhere"))
    assert source.kind == "adapters" and source.paths == [adapter, adapter]


def test_an_output_dir_without_an_adapter_says_what_it_holds(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(TunepipeError, match="holds no adapter_config.json") as info:
        adapter_dir(str(tmp_path))
    assert "output_dir of a LoRA train run" in info.value.hint
    full = Layout.at(tmp_path).full
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(str(full))
    with pytest.raises(TunepipeError, match="holds a full fine-tune, not an adapter") as info:
        adapter_dir(str(tmp_path))
    assert f"model_name_or_path: {full}" in info.value.hint


def test_a_full_finetune_output_dir_is_accepted_as_model_name_or_path(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(TunepipeError, match="no config.json"):
        resolve_source(str(tmp_path))
    full = Layout.at(tmp_path).full
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(str(full))
    source = resolve_source(str(tmp_path))
    assert source.kind == "hf_dir" and source.path == full.resolve()
