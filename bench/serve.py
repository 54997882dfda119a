"""Serving throughput: `tunepipe serve` vs `llamafactory-cli api` (huggingface backend), same model.

    .venv/bin/python -P bench/serve.py [--requests 16] [--max-tokens 32] [--levels 1 4 16]

Both servers load the embedded SmolLM2-135M-Instruct converted to one float32 HF dir
(`_common.base_model_dir`), use the tokenizer's own chat template, run on 127.0.0.1 with
OMP_NUM_THREADS=1 and stay up for the whole run; at each concurrency level the two sides
are measured back to back, in alternating order, with the same prompts (alpaca demo
instructions), greedy, `max_tokens` fixed. A level sends `--requests` non-streamed requests
from that many client threads at once; requests/s and output tokens/s (the servers' own
`usage.completion_tokens`) are over the level's wall time. LLaMA-Factory runs as its users
get it (`MAX_CONCURRENT` unset: it answers one request at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # appended: bench/tokenize.py must not shadow tokenize

from _common import (
    DEFAULT_WORK,
    LF_DEMO,
    LF_PYTHON,
    TUNEPIPE_PYTHON,
    base_model_dir,
    check_prerequisites,
    child_env,
    machine_summary,
    print_machine,
)

SIDES = ("tunepipe", "llamafactory")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(side: str, base: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = child_env({"API_HOST": "127.0.0.1", "API_PORT": str(port), "API_MODEL_NAME": "bench",
                     "OMP_NUM_THREADS": "1"})
    work.mkdir(parents=True, exist_ok=True)
    if side == "tunepipe":
        config = work / "tp-serve.yaml"  # JSON is YAML: the same keys a LLaMA-Factory YAML has
        config.write_text(json.dumps({"model_name_or_path": str(base), "dtype": "float32", "report_to": "none",
                                      "output_dir": str(work / "tp-out")}))
        cmd = [str(TUNEPIPE_PYTHON), "-m", "tunepipe.cli", "serve", str(config)]
    else:
        config = work / "lf-api.yaml"
        config.write_text(json.dumps({"model_name_or_path": str(base), "infer_backend": "huggingface",
                                      "infer_dtype": "float32", "trust_remote_code": False}))
        cmd = [str(LF_PYTHON.parent / "llamafactory-cli"), "api", str(config)]
    log = open(work / f"{side}-server.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work))
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, work / f"{side}-server.log")
    return proc, url


def wait_ready(proc, url: str, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"[bench] server exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"[bench] server at {url} not ready after {timeout}s; log {log}")


def prompts(count: int) -> list[str]:
    rows = json.loads((LF_DEMO / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    return [(row["instruction"] + "\n" + row.get("input", "")).strip() for row in rows[:count]]


def one(url: str, question: str, max_tokens: int) -> int:
    import httpx

    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens}
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    return int(reply.json()["usage"]["completion_tokens"])


def level(url: str, questions: list[str], concurrency: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = list(pool.map(lambda q: one(url, q, max_tokens), questions))
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "requests_per_s": round(len(questions) / seconds, 3),
            "output_tokens_per_s": round(sum(tokens) / seconds, 1), "output_tokens": sum(tokens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per level and side")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, default=None, help="write all figures to this file")
    args = parser.parse_args()
    check_prerequisites()
    base = base_model_dir(args.work_dir)
    machine = machine_summary()
    questions = prompts(args.requests)
    servers = {side: start(side, base, args.work_dir / "serve") for side in SIDES}
    results: dict = {side: {} for side in SIDES}
    try:
        for url in (u for _, u in servers.values()):
            one(url, questions[0], 4)  # warm-up: first-call allocations are not measured
        for index, concurrency in enumerate(args.levels):
            for side in SIDES if index % 2 == 0 else reversed(SIDES):
                results[side][concurrency] = level(servers[side][1], questions, concurrency, args.max_tokens)
                print(f"[bench] {side} c={concurrency}: {results[side][concurrency]}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    machine["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    report(results, machine, args)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


def report(results: dict, machine: dict, args) -> None:
    print_machine(machine)
    print(f"[bench] load average (1 min) at the end: {machine['load_avg_1m_end']}; "
          f"{args.requests} requests x max_tokens {args.max_tokens} per level, greedy, OMP_NUM_THREADS=1")
    print("| concurrency | side | requests/s | output tokens/s | output tokens | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for concurrency in args.levels:
        for side in SIDES:
            r = results[side][concurrency]
            print(f"| {concurrency} | {side} | {r['requests_per_s']} | {r['output_tokens_per_s']} | "
                  f"{r['output_tokens']} | {r['seconds']} |")
    for concurrency in args.levels:
        ratio = (results["tunepipe"][concurrency]["output_tokens_per_s"]
                 / max(results["llamafactory"][concurrency]["output_tokens_per_s"], 1e-9))
        print(f"[bench] c={concurrency}: tunepipe output tokens/s = {ratio:.2f}x LLaMA-Factory's")


if __name__ == "__main__":
    sys.exit(main())
