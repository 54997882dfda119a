"""`tunepipe train` / `export` as a user runs them: a child process on a flat YAML.

Used by the interrupted-run tests (reruns, damaged checkpoints, concurrent runs, full disks,
preemption). The data is the project's own `data/identity` demo set; the model is the tiny
random Llama of the session.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TRAIN = {"stage": "sft", "finetuning_type": "lora", "dataset": "identity", "cutoff_len": 64,
         "per_device_train_batch_size": 2, "logging_steps": 1, "learning_rate": 1.0e-2,
         "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "report_to": "none"}


def write_config(path: Path, model_dir: Path, output_dir: Path, **keys) -> Path:
    """A flat LLaMA-Factory-style YAML training the tiny model on the demo identity set."""
    cfg = {"model_name_or_path": str(model_dir), "dataset_dir": str(REPO / "data"),
           "output_dir": str(output_dir), **TRAIN, **keys}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunepipe.cli", *args]


def file_size_limit(limit: int):
    """A preexec_fn: no file of the child may grow past `limit` bytes (RLIMIT_FSIZE), the way a
    full disk stops writes. SIGXFSZ ignored, so a write past it fails with EFBIG instead of
    killing the process."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_cli(*args: str, file_limit: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=file_size_limit(file_limit) if file_limit else None, check=False)


def run_here(*args: str) -> int:
    """`tunepipe ARGS` in this process (same `cli.main`, same code path), for the steps a test only
    needs done, not observed: a child process spends seconds of CPU importing torch, transformers,
    PEFT and DeepSpeed before its first line of work (docs/benchmarks.md, "The test suite"). The
    environment is restored afterwards (the CLI names DeepSpeed's accelerator in it)."""
    from tunepipe.cli import main

    saved = dict(os.environ)
    try:
        return main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_here_logged(*args: str) -> int:
    """`run_here`, with the CLI's log lines written to stderr as a child's are (`cli.main` calls
    `logging.basicConfig`, which does nothing under pytest: its capture handlers are already on
    the root logger). For a rerun whose stderr the test reads: read it with pytest's `capfd`,
    which also holds what launched ranks (torchrun's children) wrote to file descriptor 2.
    Library warnings are not a child's here (Python shows each once per process): a test that
    checks for their absence keeps a child process."""
    import logging

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return run_here(*args)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def start_cli(*args: str, quiet: bool = False) -> subprocess.Popen:
    """The run in the background; read its output with `communicate()` (`quiet`: discard it,
    for a long run whose progress bar would fill the pipe)."""
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(command(*args), env=cli_env(), stdout=out, stderr=out, text=True)


def adapter_weights(output_dir: Path) -> dict:
    return load_file(output_dir / "models" / "adapter" / "adapter_model.safetensors")


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content (the run's outputs, for byte comparisons)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (output_dir / "checkpoints").glob("checkpoint-*"))
