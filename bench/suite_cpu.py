"""pytest plugin: CPU seconds per test file, child processes included (docs/benchmarks.md, "The test suite").

Wall time on a shared 2-core machine says more about the neighbours than about the tests, so this
records user + system CPU of the test process and of every child process it waited for
(`getrusage(RUSAGE_CHILDREN)`: `tunepipe`, `dvc`, `torchrun` children and their own waited-for
children), per file, from the first test's setup to the last test's teardown (module fixtures
included; a session fixture counts in the first file that asks for it).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p bench.suite_cpu -n 2 --dist loadfile tests
    .venv/bin/python bench/suite_cpu.py            # the table, slowest first

Each process (each xdist worker) writes .pytest_cache/suite-cpu/<worker>.json; the script merges them.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import pytest

OUT_DIR = Path(__file__).resolve().parents[1] / ".pytest_cache" / "suite-cpu"
_seconds: dict[str, float] = {}


def _cpu_now() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = _cpu_now()
    yield
    file = item.nodeid.split("::", 1)[0]
    _seconds[file] = _seconds.get(file, 0.0) + _cpu_now() - start
    if nextitem is None or nextitem.nodeid.split("::", 1)[0] != file:
        _write()  # after each file, so that an interrupted run still leaves its figures


def _write() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (OUT_DIR / f"{worker}.json").write_text(json.dumps(_seconds, indent=1))


def main() -> None:
    merged: dict[str, float] = {}
    for part in sorted(OUT_DIR.glob("*.json")):
        for file, seconds in json.loads(part.read_text()).items():
            merged[file] = merged.get(file, 0.0) + seconds
    for file, seconds in sorted(merged.items(), key=lambda kv: -kv[1]):
        print(f"| {file} | {seconds:.0f} |")
    print(f"| total | {sum(merged.values()):.0f} |", file=sys.stderr)


if __name__ == "__main__":
    main()
