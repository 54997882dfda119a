"""Two `tunepipe train` at once: on one output_dir the second is refused, naming the first;
a killed run's lock does not block; on two output_dirs sharing one new MLflow store both track.
"""

from __future__ import annotations

import json
import signal
import socket
import time

from tests.e2e.cli_runs import run_cli, run_here, start_cli, write_config


def wait_for(path, proc, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.is_file(), f"{path} never appeared"


def test_one_run_per_output_dir_and_a_killed_runs_lock_does_not_block(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    long_run = write_config(tmp_path / "long.yaml", tiny_model_dir, out, max_steps=100000, save_steps=100000)
    first = start_cli("train", str(long_run), quiet=True)
    try:
        wait_for(out / ".tunepipe.lock.json", first)
        second = run_cli("train", str(long_run))
        assert first.poll() is None  # refused while the first one runs, not after waiting for it
    finally:
        first.send_signal(signal.SIGKILL)  # and the first dies without releasing anything itself
        first.communicate()
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    error = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"{out} is in use by another tunepipe run: pid {first.pid} on " \
                               f"{socket.gethostname()}, started " in error[0], second.stderr
    assert (out / ".tunepipe.lock").exists()  # what the killed run left behind

    short_run = write_config(tmp_path / "short.yaml", tiny_model_dir, out, max_steps=2, save_steps=100)
    assert run_here("train", str(short_run)) == 0  # in this process: only its outcome is checked
    assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 2
    assert not (out / ".tunepipe.lock.json").exists()  # the owner note goes when the run ends


def test_two_runs_sharing_a_new_mlflow_store_both_track(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # not created yet: both runs create it
    procs = []
    for name in ("a", "b"):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name, max_steps=2,
                           save_steps=100, report_to="mlflow", tracking_uri=store, run_name=f"run-{name}")
        procs.append(start_cli("train", str(cfg)))
    results = [(proc.communicate(timeout=900)[1], proc) for proc in procs]
    for stderr, proc in results:
        assert proc.returncode == 0, stderr
        assert "tracking disabled" not in stderr, stderr

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(run.info.run_name for run in runs) == ["run-a", "run-b"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    for name in ("a", "b"):
        record = json.loads((tmp_path / name / "models" / "adapter" / "tunepipe_run.json").read_text())
        assert record["mlflow_run_id"] in {run.info.run_id for run in runs}
