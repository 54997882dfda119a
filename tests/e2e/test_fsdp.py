"""FSDP2 and DeepSpeed ZeRO-2/3 on CPU (gloo) and a 2-node run, through `train.accelerate_config`
(or LLaMA-Factory's `fsdp` keys) / `train.num_machines`.

The reference is one process with accumulation 8 over 8 rows (one optimizer step per epoch).
2 processes x accumulation 4 make the same steps, so with the same seed FSDP (LoRA) and two
"nodes" of one process each (torchrun --nnodes 2, rendezvous on 127.0.0.1) must reproduce its
loss per step and its adapter (float32); so must DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's CPU
accelerator). tests/e2e/test_ddp.py shows that one node with 2
processes matches the same reference, so the 2-node run equals the 1-node one too.
FSDP+QLoRA and FSDP full fine-tuning must each leave one ordinary output: a PEFT adapter that
loads on the unquantized base, an HF model dir that loads with every weight present.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.fixtures.same_training import adapter_tensors, assert_same_training, loss_points

from tunepipe.config.loader import load_config
from tunepipe.layout import Layout
from tunepipe.pipeline import run_train_pipeline

REPO = Path(__file__).resolve().parents[2]
FSDP = str(REPO / "configs" / "accelerate" / "fsdp.yaml")


def write_config(path: Path, tiny_model_dir, lf_demo_dir, **train) -> Path:
    settings = {
        "model": {"model_name_or_path": str(tiny_model_dir)},
        "data": {"dataset": "identity", "dataset_dir": str(lf_demo_dir), "max_samples": 8,
                 "cutoff_len": 64, "val_size": 0.0},
        "train": {"per_device_train_batch_size": 1, "num_train_epochs": 3.0, "logging_steps": 1,
                  "learning_rate": 1.0e-3, "lr_scheduler_type": "cosine", "save_steps": 100, "seed": 7, **train},
        "tracking": {"report_to": "none"},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir, lf_demo_dir) -> Path:
    return write_config(tmp_path_factory.mktemp("fsdp") / "cfg.yaml", tiny_model_dir, lf_demo_dir)


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory) -> Layout:
    """The reference: 1 process, accumulation 8."""
    layout = Layout.at(tmp_path_factory.mktemp("single"))
    run_train_pipeline(load_config(config, ["train.gradient_accumulation_steps=8"]), layout)
    return layout


def test_fsdp_lora_matches_one_process_with_doubled_accumulation(config, one_process, tmp_path):
    """Through LLaMA-Factory's Trainer keys `fsdp` / `fsdp_transformer_layer_cls_to_wrap`, which
    tunepipe writes as configs/accelerate/fsdp.yaml's FSDP2 settings (tests/test_launch.py shows
    the two configs equal): the QLoRA and full runs below use the accelerate config itself."""
    fsdp = Layout.at(tmp_path)
    run_train_pipeline(load_config(config, ["fsdp=[full_shard, auto_wrap]", "train.num_processes=2",
                                            "fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer",
                                            "train.gradient_accumulation_steps=4"]), fsdp)
    assert_same_training(fsdp, one_process)


# ZeRO-3 through an accelerate config; ZeRO-2 and ZeRO-3 through LLaMA-Factory's DeepSpeed JSON below
@pytest.mark.parametrize("stage", [3])
def test_deepspeed_lora_matches_one_process_with_doubled_accumulation(config, one_process, tmp_path, stage):
    pytest.importorskip("deepspeed")
    zero = Layout.at(tmp_path)
    accelerate_config = REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml"
    run_train_pipeline(load_config(config, [f"train.accelerate_config={accelerate_config}",
                                            "train.num_processes=2", "train.gradient_accumulation_steps=4"]), zero)
    assert_same_training(zero, one_process)
    assert (zero.checkpoints / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's engine saved it


@pytest.mark.parametrize("stage", [2, 3])
def test_llamafactory_deepspeed_json_matches_one_process_with_doubled_accumulation(
        config, one_process, tmp_path, stage, capfd):
    """`deepspeed: examples/deepspeed/ds_z{2,3}_config.json`, LLaMA-Factory's own files read unchanged.
    The launched ranks import DeepSpeed (plain runs no longer do: errors.defer_unused_deepspeed),
    and print no DeepSpeed accelerator line (errors.name_deepspeed_accelerator)."""
    pytest.importorskip("deepspeed")
    json_file = REPO.parent / "shared" / "llamafactory-examples" / "deepspeed" / f"ds_z{stage}_config.json"
    if not json_file.is_file():
        pytest.skip(f"{json_file} not found")
    zero = Layout.at(tmp_path)
    run_train_pipeline(load_config(config, [f"train.deepspeed={json_file}", "train.num_processes=2",
                                            "train.gradient_accumulation_steps=4"]), zero)
    assert_same_training(zero, one_process)
    saved = {path.name for path in (zero.checkpoints / "checkpoint-3" / "global_step3").iterdir()}
    # DeepSpeed names ZeRO-3's partitioned model states per rank; ZeRO-2 keeps one model file
    expected = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    assert expected in saved, saved
    stderr = capfd.readouterr().err
    assert "Setting accelerator to CPU" not in stderr and "[real_accelerator" not in stderr, stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_match_one_process_with_doubled_accumulation(config, one_process, tmp_path):
    """Machine 1 is a second `tunepipe train` started the way a user would on another node;
    machine 0 runs in this process. Both use one shared output dir, as nodes on shared storage."""
    nodes = ["train.num_machines=2", "train.num_processes=2", "train.main_process_ip=127.0.0.1",
             f"train.main_process_port={free_port()}", "train.gradient_accumulation_steps=4",
             f"train.output_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    machine_1 = subprocess.Popen([sys.executable, "-m", "tunepipe.cli", "train", str(config),
                                  *nodes, "train.machine_rank=1"], env=env)
    try:
        run_train_pipeline(load_config(config, [*nodes, "train.machine_rank=0"]), Layout.at(tmp_path))
        assert machine_1.wait(timeout=300) == 0
    finally:
        if machine_1.poll() is None:
            machine_1.kill()
    assert_same_training(Layout.at(tmp_path), one_process)


def test_fsdp_qlora_saves_an_ordinary_adapter_for_the_unquantized_base(tiny_model_dir, lf_demo_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path / "cfg.yaml", tiny_model_dir, lf_demo_dir, num_train_epochs=1.0)
    layout = Layout.at(tmp_path / "run")
    run_train_pipeline(load_config(config, [f"train.accelerate_config={FSDP}", "train.num_processes=2",
                                            "train.gradient_accumulation_steps=1", "model.quantization_bit=4"]),
                       layout)
    losses = [loss for _, loss in loss_points(layout)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    tensors = adapter_tensors(layout)
    assert tensors and all(".lora_A." in name or ".lora_B." in name for name in tensors)
    assert all(t.dtype == torch.float32 and "DTensor" not in type(t).__name__ for t in tensors.values())
    assert any(t.abs().max() > 0 for name, t in tensors.items() if ".lora_B." in name)  # B starts at 0

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(layout.adapter))  # no quantization anywhere
        tuned_logits = tuned(input_ids=ids).logits
    assert not any("quant" in type(m).__name__.lower() or "4bit" in type(m).__name__ for m in tuned.modules())
    assert (tuned_logits - base_logits).abs().max() > 1e-6


def test_fsdp_full_saves_one_ordinary_model_dir(tiny_model_dir, lf_demo_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path / "cfg.yaml", tiny_model_dir, lf_demo_dir, num_train_epochs=1.0,
                          finetuning_type="full", learning_rate=1.0e-4)
    layout = Layout.at(tmp_path / "run")
    run_train_pipeline(load_config(config, [f"train.accelerate_config={FSDP}", "train.num_processes=2",
                                            "train.gradient_accumulation_steps=4"]), layout)
    shards = sorted(layout.full.glob("*.safetensors"))
    assert [path.name for path in shards] == ["model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tuned, info = AutoModelForCausalLM.from_pretrained(str(layout.full), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = load_file(str(shards[0]))
    assert set(saved) <= set(tuned.state_dict()) and all(type(t) is torch.Tensor for t in saved.values())
    changed = [name for name, t in tuned.state_dict().items() if not torch.equal(t, base.state_dict()[name])]
    assert len(changed) == len(base.state_dict())  # every weight trained, none lost in the gather
