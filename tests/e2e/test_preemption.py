"""SIGTERM (a spot instance's notice) or SIGINT (Ctrl-C) during `tunepipe train`.

The run finishes its step, saves a checkpoint there, says where in one line and exits
(128 + the signal); the same command run again resumes from that checkpoint and ends with
the adapter an uninterrupted run produces. With two processes (DDP over gloo) the signal
reaches both ranks through `tunepipe train`, and they stop at the same step.

The signalled runs are child processes; the references and the reruns (their stderr captured)
go through the same `cli.main` in this process (cli_runs.run_here / run_here_logged), which
saves a child's imports, about 12 CPU s each.
"""

from __future__ import annotations

import csv
import json
import signal
import time

import pytest
import torch
from tests.e2e.cli_runs import (
    adapter_weights,
    checkpoint_steps,
    run_here,
    run_here_logged,
    start_cli,
    write_config,
)

STEPS = {"max_steps": 12, "save_steps": 2}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """The reference run, trained in this process: only its outputs are compared (cli_runs.run_here)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert run_here("train", str(write_config(root / "train.yaml", tiny_model_dir, root / "out", **STEPS))) == 0
    return root / "out"


def signal_after_first_checkpoint(cfg, out, signum) -> tuple[int, str]:
    """Start the run, send `signum` once checkpoint-2 is complete, wait for it to exit."""
    proc = start_cli("train", str(cfg))
    manifest = out / "checkpoints" / "checkpoint-2" / "tunepipe_manifest.json"
    deadline = time.monotonic() + 600
    while not manifest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=600)
    return proc.returncode, stderr


def loss_steps(out) -> list[int]:
    with open(out / "plots" / "train_loss.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_the_rerun_ends_where_an_uninterrupted_run_does(
        tmp_path, tiny_model_dir, uninterrupted, signum, capfd):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "train.yaml", tiny_model_dir, out, **STEPS)
    code, stderr = signal_after_first_checkpoint(cfg, out, signum)

    assert code == 128 + signum, stderr
    assert "Traceback" not in stderr
    saved = checkpoint_steps(out)[-1]
    assert 2 < saved < STEPS["max_steps"]  # the step it was on, not the last regular checkpoint
    said = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert said == [(f"interrupted: {signal.Signals(signum).name}: saved {out / 'checkpoints'}/checkpoint-{saved} "
                    f"(step {saved} of 12); run the same command again to resume from it")]
    assert not (out / "models" / "adapter").exists()  # no output that looks finished

    capfd.readouterr()  # the signalled run's output is read above; what follows is the rerun's
    code, rerun_stderr = run_here_logged("train", str(cfg)), capfd.readouterr().err
    assert code == 0, rerun_stderr
    assert f"resuming from {out / 'checkpoints'}/checkpoint-{saved}" in rerun_stderr
    resumed, straight = adapter_weights(out), adapter_weights(uninterrupted)
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-5, msg=name)
    assert loss_steps(out) == loss_steps(uninterrupted) == list(range(1, 13))
    metrics = json.loads((out / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 12
    assert metrics["tokens_seen"] == json.loads((uninterrupted / "metrics" / "train.json").read_text())["tokens_seen"]


def test_sigterm_to_a_two_process_run_stops_every_rank_at_one_step(tmp_path, tiny_model_dir, capfd):
    steps = {"max_steps": 8, "save_steps": 2, "num_processes": 2}
    straight = tmp_path / "straight"
    # the reference launches its two ranks from this process (only its outputs are compared)
    assert run_here("train", str(write_config(tmp_path / "straight.yaml", tiny_model_dir, straight, **steps))) == 0
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "train.yaml", tiny_model_dir, out, **steps)
    code, stderr = signal_after_first_checkpoint(cfg, out, signal.SIGTERM)

    assert code == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr  # the launcher saw no failure: the ranks exited cleanly
    saved = checkpoint_steps(out)[-1]
    assert 2 < saved < 8
    said = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert said == [(f"interrupted: SIGTERM: saved {out / 'checkpoints'}/checkpoint-{saved}; "
                    "run the same command again to resume from it")]
    assert stderr.count("saving a checkpoint at the end of this step") == 2  # both ranks

    capfd.readouterr()
    code, rerun_stderr = run_here_logged("train", str(cfg)), capfd.readouterr().err
    assert code == 0, rerun_stderr
    assert f"resuming from {out / 'checkpoints'}/checkpoint-{saved}" in rerun_stderr
    resumed, reference = adapter_weights(out), adapter_weights(straight)
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-5, msg=name)
    assert loss_steps(out) == loss_steps(straight) == list(range(1, 9))
