"""Re-running `tunepipe train`: a finished run trains nothing; damaged checkpoints are skipped.

Through the CLI on the tiny model: a finished run run again leaves every file byte-identical
and never trains past max_steps; with its outputs lost it rewrites them from the final
checkpoint, identically. A damaged newest checkpoint is replaced by the newest intact one
(one warning line); with none intact the run starts over; never a traceback.

The first run is a child process (its stderr must hold no library warning, which Python shows
once per process); the reruns go through the same `cli.main` in this process with their stderr
captured (cli_runs.run_here_logged): a child spends about 12 CPU s importing before it starts.
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.e2e.cli_runs import (
    adapter_weights,
    checkpoint_steps,
    file_bytes,
    run_cli,
    run_here_logged,
    write_config,
)

STEPS = {"max_steps": 4, "save_steps": 2}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted run (4 steps, checkpoints at 2 and 4); its files as bytes, its stderr."""
    root = tmp_path_factory.mktemp("finished")
    cfg = write_config(root / "train.yaml", tiny_model_dir, root / "out", **STEPS)
    done = run_cli("train", str(cfg))
    assert done.returncode == 0, done.stderr
    return cfg, root / "out", file_bytes(root / "out"), done.stderr


def fresh_copy(tmp_path, tiny_model_dir, finished_run):
    """The finished run's output dir copied, with a config pointing at the copy."""
    import shutil

    out = finished_run[1]
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return write_config(tmp_path / "train.yaml", tiny_model_dir, copy, **STEPS), copy


def test_a_cpu_run_prints_no_library_noise(finished_run):
    """No FutureWarning from PEFT reading a deprecated transformers property, and no DeepSpeed
    accelerator line (a plain run no longer imports DeepSpeed at all, test_errors; the launched
    DeepSpeed ranks of test_fsdp check the line where DeepSpeed is imported)."""
    stderr = finished_run[3]
    assert "== train ==" in stderr
    assert "FutureWarning" not in stderr and "is_gradient_checkpointing" not in stderr, stderr
    assert "Setting accelerator to CPU" not in stderr and "[real_accelerator" not in stderr, stderr


def test_a_finished_run_run_again_trains_nothing_and_changes_no_byte(tmp_path, tiny_model_dir, finished_run,
                                                                     capfd):
    cfg, out = fresh_copy(tmp_path, tiny_model_dir, finished_run)
    before = file_bytes(out)
    code, stderr = run_here_logged("train", str(cfg)), capfd.readouterr().err
    assert code == 0, stderr
    assert "already trained: 4 steps" in stderr
    assert file_bytes(out) == before  # adapter, metrics, checkpoints, shards: not one byte differs
    assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 4
    assert checkpoint_steps(out) == [2, 4]


def test_lost_outputs_are_rewritten_from_the_final_checkpoint(tmp_path, tiny_model_dir, finished_run, capfd):
    cfg, out = fresh_copy(tmp_path, tiny_model_dir, finished_run)
    original = finished_run[2]
    import shutil

    shutil.rmtree(out / "models" / "adapter")
    (out / "metrics" / "train.json").unlink()
    code, stderr = run_here_logged("train", str(cfg)), capfd.readouterr().err
    assert code == 0, stderr
    assert "final step: nothing to train" in stderr
    rewritten = file_bytes(out / "models" / "adapter")
    assert rewritten == {k.removeprefix("models/adapter/"): v for k, v in original.items()
                         if k.startswith("models/adapter/")}
    metrics = json.loads((out / "metrics" / "train.json").read_text())
    first = json.loads(original["metrics/train.json"])
    assert metrics["steps"] == 4  # not a 5th step
    for key in ("final_loss", "train_loss", "tokens_seen", "epochs"):
        assert metrics[key] == pytest.approx(first[key], rel=1e-9), key
    assert (out / "plots" / "train_loss.csv").read_bytes() == original["plots/train_loss.csv"]
    assert run_here_logged("train", str(cfg)) == 0
    assert capfd.readouterr().err.count("already trained") == 1  # and now it is finished


@pytest.mark.parametrize("damaged", ["newest", "all"])
def test_a_damaged_checkpoint_is_skipped_with_one_warning(tmp_path, tiny_model_dir, finished_run, damaged, capfd):
    cfg, out = fresh_copy(tmp_path, tiny_model_dir, finished_run)
    import shutil

    shutil.rmtree(out / "models" / "adapter")  # as if killed after the last checkpoint, before the outputs
    for step in ([4] if damaged == "newest" else [2, 4]):
        weights = out / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"
        with open(weights, "r+b") as handle:
            handle.truncate(100)
    code, stderr = run_here_logged("train", str(cfg)), capfd.readouterr().err
    assert code == 0, stderr
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("WARNING") and "damaged" in line]
    assert len(warnings) == 1, stderr
    assert "adapter_model.safetensors is 100 bytes" in warnings[0]
    if damaged == "newest":
        assert "resuming from checkpoint-2" in warnings[0]
    else:
        assert "no intact checkpoint left: starting over" in warnings[0]
    reference = adapter_weights(finished_run[1])
    resumed = adapter_weights(out)
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-5, msg=name)
    assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 4
    assert checkpoint_steps(out) == [2, 4]
