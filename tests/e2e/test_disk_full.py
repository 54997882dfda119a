"""A full disk during tokenize, a checkpoint save and export: a clear error, nothing that looks
complete, and the same command completes once there is space.

The disk fills up as a file-size limit (RLIMIT_FSIZE) on the child process: a write past it
fails with EFBIG as a write to a full disk fails with ENOSPC. Each limit is measured from
what the earlier steps wrote, so that the step under test is the first to hit it.
"""

from __future__ import annotations

import json

from tests.e2e.cli_runs import checkpoint_steps, run_cli, run_here, write_config

STEPS = {"max_steps": 4, "save_steps": 2}


def largest_file(*folders) -> int:
    return max(p.stat().st_size for folder in folders for p in folder.rglob("*") if p.is_file())


def assert_clear_error(done, what: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and what in errors[0], done.stderr


def leftovers(folder) -> list[str]:
    """Temporary siblings an interrupted atomic write would leave."""
    return sorted(p.name for p in folder.rglob(".*tmp-*"))


def test_a_full_disk_fails_clearly_and_the_rerun_with_space_completes(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    cfg = str(write_config(tmp_path / "train.yaml", tiny_model_dir, out, **STEPS))
    # Only the runs that meet the full disk are child processes (the file-size limit is per process);
    # the steps that merely prepare or complete the state run in this process (cli_runs.run_here).
    assert run_here("validate", cfg) == 0
    validated = largest_file(out / "data", out / "reports")

    # tokenize: the shards are the first file bigger than the validated rows
    done = run_cli("train", cfg, file_limit=validated + 1024)
    assert_clear_error(done, f"error: out of disk space writing {out / 'data' / 'tokenized'} (File too large)")
    assert not (out / "data" / "tokenized").exists() and not leftovers(out)
    assert run_here("tokenize", cfg) == 0  # with space
    shards = largest_file(out / "data", out / "reports")

    # a checkpoint save: optimizer.pt (two Adam moments of every LoRA weight) is the first file too big
    done = run_cli("train", cfg, file_limit=shards + 1024)
    assert_clear_error(done, f"error: saving {out / 'checkpoints' / 'checkpoint-2'} failed")
    assert "The partial checkpoint was removed" in done.stderr
    assert "it starts from the beginning" in done.stderr
    assert checkpoint_steps(out) == [] and not (out / "models" / "adapter").exists()
    assert not (out / "metrics" / "train.json").exists() and not leftovers(out)
    assert run_here("train", cfg) == 0  # with space
    assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 4
    assert checkpoint_steps(out) == [2, 4]

    # export: the merged model's shard is bigger than anything training wrote
    export_dir = tmp_path / "export"
    export_cfg = str(write_config(tmp_path / "export.yaml", tiny_model_dir, out,
                                  adapter_name_or_path=str(out / "models" / "adapter"),
                                  export_dir=str(export_dir)))
    done = run_cli("export", export_cfg, file_limit=largest_file(out / "models" / "adapter") + 1024)
    assert_clear_error(done, f"error: out of disk space writing {export_dir} (File too large)")
    assert not export_dir.exists() and not leftovers(tmp_path)
    assert run_here("export", export_cfg) == 0
    assert (export_dir / "model.safetensors.index.json").is_file()
