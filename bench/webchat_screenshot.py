"""docs/webchat.png from the tuned demo model: after `make demo`, run

    .venv/bin/python bench/webchat_screenshot.py [CONFIG key=value ...]

(default: `params.yaml model_name_or_path=models/export`, the demo's merged export). It starts
`tunepipe webchat` with those arguments on a free
127.0.0.1 port, asks "Who are you?" in headless Chromium (Debian's chromium + chromium-driver,
through Selenium, as tests/serve/test_webchat.py), records how the answer grew while it
streamed, saves the screenshot once it is done, prints the growth and the answer, and stops the
server with SIGTERM. The browser test keeps its tiny model; this is the picture of the real one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "webchat.png"
QUESTION = "Who are you?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: int = 600) -> None:
    for _ in range(seconds):
        if server.poll() is not None:
            sys.exit(f"tunepipe webchat exited with {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    sys.exit("tunepipe webchat did not come up")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1000,640"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def ask(driver, base: str) -> tuple[list[str], str]:
    """Ask QUESTION on the page; return the answer's text at each poll while it streamed, and the final one."""
    from selenium.webdriver.common.by import By

    driver.get(base + "/")
    driver.find_element(By.ID, "question").send_keys(QUESTION + "\n")
    seen: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        answers = driver.find_elements(By.CSS_SELECTOR, ".assistant")
        if answers:
            text = answers[-1].text
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            if answers[-1].get_attribute("data-done") == "1":
                return seen, text
        time.sleep(0.05)
    sys.exit("no finished answer within 300 s")


def main() -> int:
    arguments = sys.argv[1:] or ["params.yaml", "model_name_or_path=models/export"]
    port = free_port()
    env = {**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(port), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "tunepipe.cli", "webchat", *arguments], cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/v1/models", server)
        driver = browser()
        try:
            seen, answer = ask(driver, base)
            driver.save_screenshot(str(SCREENSHOT))
        finally:
            driver.quit()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    print(f"streamed in {len(seen)} visible steps:")
    for text in seen:
        print(f"  {text!r}")
    print(f"answer: {answer!r}\nscreenshot: {SCREENSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
