"""SIGTERM to a `tunepipe serve` child with a streaming answer in flight: a graceful stop, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from tests.fixtures.serving import free_port


def wait_ready(proc, url: str, log) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"tunepipe serve did not start:\n{log.read_text()}")


def test_sigterm_with_a_stream_in_flight_exits_0(tiny_model_dir, strong_adapter, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(strong_adapter),
                                  "report_to": "none", "output_dir": str(tmp_path / "out")}))
    port = free_port()
    env = {**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_MODEL_NAME": "tiny",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tunepipe.cli", "serve", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Who are you?"}], "temperature": 0,
                "max_tokens": 1500, "stream": True}
        events, cut = [], False
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            events += [next(lines) for _ in range(3)]  # the answer is streaming now
            proc.send_signal(signal.SIGTERM)
            try:
                events += list(lines)
            except httpx.HTTPError:  # cancelled after the grace period: the connection is cut
                cut = True
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped by SIGTERM" in log.read_text()
    if not cut:  # finished within the grace period: a complete, well-formed stream
        assert events[-1] == "data: [DONE]"
        reasons = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
        assert reasons[-1] in ("stop", "length")
    assert len(events) > 3
