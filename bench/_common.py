"""What the benchmarks share: paths, the converted base model, the data folder, measured subprocesses.

Every measured side runs in its own subprocess, so each starts from a cold interpreter and
its peak resident memory (`ru_maxrss` from `os.wait4`) is its own.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LF_DEMO = REPO.parent / "shared" / "datasets" / "llamafactory-demo"
TUNEPIPE_PYTHON = Path(os.environ.get("TUNEPIPE_PYTHON", REPO / ".venv" / "bin" / "python"))
LF_PYTHON = Path(os.environ.get("LF_VENV", BENCH / ".lf-venv")) / "bin" / "python"
LF_DRIVER = BENCH / "lf_driver.py"
DEFAULT_WORK = BENCH / ".cache"
RESULT_PREFIX = "BENCH_RESULT "

# Neither side may reach a hub. TOKENIZERS_PARALLELISM is left as a user's shell has it
# (unset: the Rust tokenizer may use both cores), on both sides.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "DISABLE_VERSION_CHECK": "1"}


def check_prerequisites(need_llamafactory: bool = True) -> None:
    if not TUNEPIPE_PYTHON.is_file():
        sys.exit(f"{TUNEPIPE_PYTHON} is missing: run `make setup` first")
    if need_llamafactory and not LF_PYTHON.is_file():
        sys.exit(f"{LF_PYTHON} is missing: run `bash bench/setup_llamafactory.sh` first")
    if not (LF_DEMO / "alpaca_en_demo.json").is_file():
        sys.exit(f"LLaMA-Factory demo data not found at {LF_DEMO}")


def base_model_dir(work: Path) -> Path:
    """SmolLM2-135M-Instruct converted once from the embedded GGUF to a float32 HF dir.

    Both sides load this same dir, so they start from identical weights and tokenizer.
    Converted in a subprocess of the project's venv (the bench driver itself imports no torch).
    """
    out = work / "smollm2-base"
    if (out / "config.json").is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    code = ("import sys; from tunepipe.config import ModelConfig; "
            "from tunepipe.models.base import prepare_base_model; "
            "prepare_base_model(ModelConfig(), sys.argv[1])")
    print(f"[bench] converting the embedded SmolLM2 GGUF into {out} (once)", flush=True)
    subprocess.run([str(TUNEPIPE_PYTHON), "-c", code, str(out)], check=True, env=child_env())
    return out


def repeated_alpaca_dir(parent: Path, times: int) -> tuple[Path, str, int]:
    """A data folder holding alpaca_en_demo.json repeated `times` times and its dataset_info.json.

    Returns (folder, dataset name, row count). Built in a temporary folder: the shared
    file is only read.
    """
    count = len(json.loads((LF_DEMO / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    folder, name, _ = alpaca_rows_dir(parent, count * times)
    return folder, name, count * times


def alpaca_rows_dir(parent: Path, rows: int) -> tuple[Path, str, int]:
    """A data folder holding `rows` rows of alpaca_en_demo.json (repeated, then cut) as one JSON
    array, written row by row (a 2M-row file never exists as one string here)."""
    source = json.loads((LF_DEMO / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    encoded = [json.dumps(row, ensure_ascii=False) for row in source]
    folder = parent / f"alpaca_{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"alpaca_en_demo_{rows}"
    with open(folder / f"{name}.json", "w", encoding="utf-8") as handle:
        handle.write("[")
        handle.writelines(("," if i else "") + encoded[i % len(encoded)] for i in range(rows))
        handle.write("]")
    (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"}}), encoding="utf-8")
    return folder, name, rows


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    env.update(OFFLINE_ENV)
    env.update(extra or {})
    return env


@dataclass
class Measured:
    """One measured subprocess: its exit status, wall time, peak RSS and reported result."""
    returncode: int
    wall_s: float
    max_rss_mib: float
    result: dict
    log: Path
    tree_rss_mib: float = 0.0  # peak of the summed PSS of the process and all its descendants, sampled


def run_measured(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> Measured:
    """Run `cmd`, keep its output in `log`, and return its peak RSS from `os.wait4`.

    The child prints one `BENCH_RESULT {json}` line with what it measured itself.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(env),
                                cwd=str(cwd or REPO))
        sampler = TreeSampler(proc.pid)
        sampler.start()
        # wait4 gives this child's own rusage; its maxrss is the largest single process among it
        # and its waited-for descendants, not their sum: the sampler gives the sum.
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    result = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    return Measured(proc.returncode, wall, usage.ru_maxrss / 1024, result, log, sampler.peak / 2**20)


class TreeSampler:
    """Samples the summed proportional set size (PSS: resident memory, a page shared by k
    processes counting 1/k in each) of a process and its descendants every 0.1 s, worker
    processes included: what the whole tree holds in RAM. (Summed RSS would count the
    copy-on-write pages forked workers share with their parent once per process.)"""

    def __init__(self, pid: int, interval: float = 0.1):
        import threading

        self.pid, self.interval, self.peak = pid, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._done.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_full_info().pss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            self._done.wait(self.interval)


def require_ok(name: str, measured: Measured) -> None:
    if measured.returncode != 0 or not measured.result:
        tail = "\n".join(measured.log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"[bench] {name} failed (exit {measured.returncode}); log {measured.log}:\n{tail}")


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (user + system), all threads.

    Reported beside wall time because the 2 shared cores are often busy with other work:
    CPU seconds drift less with that load than wall seconds do (they still grow somewhat,
    since contended threads spin and miss caches).
    """
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def emit(result: dict) -> None:
    """What a measured child prints last, for `run_measured` to read."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def machine_summary() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": " ".join(isa), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def print_machine(summary: dict) -> None:
    print(f"[bench] machine: {summary['cpu']}, {summary['cores']} cores, ISA {summary['isa'] or '-'}, "
          f"load average (1 min) {summary['load_avg_1m']}")
