"""merge / export on the tiny model: equivalence for LoRA, DoRA and a QLoRA-trained adapter,
reload + greedy tokens, shard limits and index, ordered merges, full fine-tunes, refusals,
atomicity, the Modelfile and the LLaMA-Factory-style CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from tests.fixtures.adapters import make_adapter
from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.export import merge as export_module
from tunepipe.export.merge import run_export
from tunepipe.export.shards import export_size_bytes
from tunepipe.layout import Layout

LIMIT = "200KB"  # the tiny model is ~430 KB in float32: several shards; its largest tensor is ~140 KB


def export_config(tiny_model_dir, export_dir: Path, *overrides):
    return load_config(None, [f"model.model_name_or_path={tiny_model_dir}", f"export.export_dir={export_dir}",
                              f"export.export_size={LIMIT}", "tracking.report_to=none", *overrides])


def greedy_tokens(model, tokenizer, prompts=("Who are you?", "你好")) -> list[list[int]]:
    out = []
    for text in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                       pad_token_id=tokenizer.pad_token_id)
        out.append(generated[0, len(ids):].tolist())
    return out


def unmerged(tiny_model_dir, adapters: list[Path]):
    """base + adapters the slow way: PEFT layers on the unquantized float32 base."""
    from tunepipe.models.base import load_causal_lm
    from tunepipe.models.trained import apply_adapters

    return apply_adapters(load_causal_lm(tiny_model_dir, dtype="float32"), adapters)


def assert_index_names_every_tensor_once(export_dir: Path, limit: int) -> None:
    from safetensors import safe_open

    index = json.loads((export_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(export_dir.glob("*.safetensors"))
    assert set(index.values()) == {shard.name for shard in shards}
    names = []
    for shard in shards:
        assert shard.stat().st_size <= limit
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                names.append(name)
                assert index[name] == shard.name
    assert len(names) == len(set(names)) == len(index)


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_merged_export_matches_base_plus_adapter(kind, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunepipe.models.base import load_tokenizer

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", dora=kind == "dora", quantized=kind == "qlora",
                           scale=1.0)
    extra = ["model.quantization_bit=4"] if kind == "qlora" else []
    cfg = export_config(tiny_model_dir, tmp_path / "export", f"model.adapter_name_or_path={adapter}", *extra)
    metrics = run_export(cfg, Layout.at(tmp_path))

    assert metrics["max_abs_logit_diff"] <= metrics["logit_tolerance"] <= 1e-3
    assert metrics["merged_adapters"] == 1 and metrics["shards"] >= 2
    assert json.loads((tmp_path / "metrics" / "export.json").read_text()) == metrics
    assert_index_names_every_tensor_once(tmp_path / "export", export_size_bytes(LIMIT))

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    assert exported.dtype == torch.float32 and getattr(exported.config, "quantization_config", None) is None
    tokenizer = load_tokenizer(tmp_path / "export")
    reference = unmerged(tiny_model_dir, [adapter])
    assert greedy_tokens(exported, tokenizer) == greedy_tokens(reference, tokenizer)
    base_only = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    probe = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():  # the adapter really changes the model
        assert (base_only(probe).logits - exported(probe).logits).abs().max().item() > 1e-2
    if kind == "qlora":
        # Merged into the full-precision base: the 4-bit model it trained on differs by more than rounding.
        assert metrics["qlora_gap_max_abs_logit_diff"] > metrics["logit_tolerance"]


def test_half_precision_export_is_merged_in_float32_and_rounded_once(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    # An update smaller than the weights, as a trained adapter's is (a huge random one makes the
    # rounding of the merged weights dominate everything else).
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", scale=0.05)
    cfg = export_config(tiny_model_dir, tmp_path / "export", f"model.adapter_name_or_path={adapter}",
                        "model.dtype=bfloat16")
    metrics = run_export(cfg, Layout.at(tmp_path))
    # No further from base + adapter than plain bfloat16 inference of base + adapter is.
    assert 0 < metrics["max_abs_logit_diff"] <= metrics["dtype_noise_max_abs_logit_diff"]
    assert metrics["logit_tolerance"] == pytest.approx(2 * metrics["dtype_noise_max_abs_logit_diff"])
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "bfloat16"
    shard = min((tmp_path / "export").glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as handle:
        name = next(iter(handle.keys()))
        assert handle.get_tensor(name).dtype == torch.bfloat16
    # Each stored weight is the float32 merge rounded once to bfloat16: within half a bfloat16
    # ulp (2^-8 relative: 7 stored mantissa bits) of W + delta. Not bit-equal: CPU matmul
    # summation order may vary between runs, moving a value that sits on a rounding boundary.
    merged = unmerged(tiny_model_dir, [adapter]).merge_and_unload().state_dict()
    with safe_open(str(shard), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            error = (handle.get_tensor(name).float() - merged[name]).abs()
            assert (error <= merged[name].abs() * 2**-8 * 1.001 + 1e-30).all(), name


def test_several_adapters_merge_in_order(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    first = make_adapter(tiny_model_dir, tmp_path / "a1", seed=1, scale=0.3)
    second = make_adapter(tiny_model_dir, tmp_path / "a2", seed=2, scale=0.3)
    cfg = export_config(tiny_model_dir, tmp_path / "export", f"model.adapter_name_or_path={first},{second}")
    metrics = run_export(cfg, Layout.at(tmp_path))
    assert metrics["merged_adapters"] == 2
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    probe = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        want = unmerged(tiny_model_dir, [first, second])(probe).logits
        got = exported(probe).logits
        single = unmerged(tiny_model_dir, [second])(probe).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (got - single).abs().max().item() > 1e-2  # the first adapter is really in there


def test_full_finetune_is_exported_without_merge(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    layout = Layout.at(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        full.model.layers[0].mlp.down_proj.weight.add_(0.5)
    full.save_pretrained(str(layout.full))
    from tunepipe.models.base import load_tokenizer

    load_tokenizer(tiny_model_dir).save_pretrained(str(layout.full))
    cfg = export_config(tiny_model_dir, tmp_path / "export", "train.finetuning_type=full")
    metrics = run_export(cfg, layout)
    assert metrics["merged_adapters"] == 0 and metrics["max_abs_logit_diff"] == 0.0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    for name, tensor in full.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    return make_adapter(tiny_model_dir, tmp_path / "adapter")


def test_refuses_a_non_empty_export_dir_unless_overwrite(tiny_model_dir, tmp_path, adapter_dir):
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    cfg = export_config(tiny_model_dir, target, f"model.adapter_name_or_path={adapter_dir}")
    with pytest.raises(TunepipeError, match="not empty"):
        run_export(cfg, Layout.at(tmp_path))
    assert (target / "keep.txt").read_text() == "user data"
    cfg.train.overwrite_output_dir = True
    run_export(cfg, Layout.at(tmp_path))
    assert not (target / "keep.txt").exists() and (target / "Modelfile").is_file()
    # Modes follow the umask, not the private 0700 of the temporary dir it was built in.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((target / "model.safetensors.index.json").stat().st_mode) == 0o666 & ~umask


def test_a_failed_check_leaves_nothing_behind(tiny_model_dir, tmp_path, adapter_dir, monkeypatch):
    monkeypatch.setattr(export_module, "tolerance", lambda noise, reference: -1.0)
    cfg = export_config(tiny_model_dir, tmp_path / "out" / "export", f"model.adapter_name_or_path={adapter_dir}")
    with pytest.raises(TunepipeError, match="export check failed"):
        run_export(cfg, Layout.at(tmp_path))
    assert list((tmp_path / "out").iterdir()) == []  # no export, no temporary sibling
    assert not (tmp_path / "metrics" / "export.json").exists()


def test_export_size_in_gb_or_with_a_unit(tiny_model_dir, tmp_path, adapter_dir):
    assert export_size_bytes(2) == 2 * 10**9 and export_size_bytes("200MB") == 200 * 10**6
    assert export_size_bytes("1.5") == 1_500_000_000
    with pytest.raises(TunepipeError, match="export_size"):
        export_size_bytes("lots")
    cfg = export_config(tiny_model_dir, tmp_path / "export", f"model.adapter_name_or_path={adapter_dir}",
                        "export.export_size=50KB")
    with pytest.raises(TunepipeError, match="too small: tensor model.embed_tokens.weight"):
        run_export(cfg, Layout.at(tmp_path))
    assert not (tmp_path / "export").exists()


def test_llamafactory_style_export_command(tiny_model_dir, tmp_path, adapter_dir, monkeypatch):
    from tunepipe.cli import main

    flat = tmp_path / "merge.yaml"
    flat.write_text(f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {adapter_dir}\n"
                    f"template: chatml\nfinetuning_type: lora\nexport_dir: {tmp_path / 'merged'}\n"
                    "export_size: 1\nexport_device: cpu\nexport_legacy_format: false\nreport_to: none\n")
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(flat)]) == 0
    assert main(["export", str(flat)]) == 2  # second time: the export dir is not empty
    metrics = json.loads((tmp_path / "saves" / "run" / "metrics" / "export.json").read_text())
    assert metrics["shards"] == 1 and metrics["modelfile_template"] == 1  # one shard still has an index
    assert_index_names_every_tensor_once(tmp_path / "merged", export_size_bytes(1))

    # The Modelfile: the YAML's `template: chatml` (LLaMA-Factory's ChatML, which has no default
    # system prompt, unlike the tokenizer's own template) as a Go template, and its stop words.
    text = (tmp_path / "merged" / "Modelfile").read_text()
    assert text.splitlines()[1] == "FROM ."
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}' in text
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n' in text
    assert "SYSTEM" not in text and "You are a tiny test assistant." not in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    saved = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert 2 in (saved["eos_token_id"] if isinstance(saved["eos_token_id"], list) else [saved["eos_token_id"]])
    assert (tmp_path / "merged" / "chat_template.jinja").is_file() or \
        "chat_template" in json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())


def test_legacy_pickle_format_is_refused_with_a_reason():
    with pytest.raises(TunepipeError, match="safetensors only"):
        load_config(None, ["export.export_legacy_format=true"])


def test_a_train_output_dir_merges_in_order_with_other_adapters(tiny_model_dir, tmp_path, caplog):
    """LLaMA-Factory's merge YAML names the train output_dir; with a second adapter after it
    (`a, b`, spaces as LLaMA-Factory users write them) both merge in that order."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "saves" / "sft"
    first = make_adapter(tiny_model_dir, Layout.at(run).adapter, seed=1, scale=0.3)
    second = make_adapter(tiny_model_dir, tmp_path / "a2", seed=2, scale=0.3)
    cfg = export_config(tiny_model_dir, tmp_path / "export", f"model.adapter_name_or_path='{run}, {second}'")
    with caplog.at_level("INFO", logger="tunepipe.models.trained"):
        metrics = run_export(cfg, Layout.at(tmp_path))
    assert metrics["merged_adapters"] == 2
    said = [r.getMessage() for r in caplog.records if "tunepipe output_dir" in r.getMessage()]
    assert said == [f"adapter_name_or_path {run} is a tunepipe output_dir: using its trained adapter {first}"]
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    probe = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        got = exported(probe).logits
        want = unmerged(tiny_model_dir, [first, second])(probe).logits
        second_only = unmerged(tiny_model_dir, [second])(probe).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (got - second_only).abs().max().item() > 1e-2  # the output_dir's adapter is really in there
