"""`tunepipe webchat`: headless Chromium (Debian's chromium + chromium-driver, through Selenium) loads the
page, types a question, and sees the streamed answer, which equals the API's answer. Its screenshot stays
in the test's tmp dir: docs/webchat.png shows the tuned demo model (bench/webchat_screenshot.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest

from tests.fixtures.serving import running, serve_config
from tunepipe.layout import Layout

CHROMIUM, DRIVER = "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(DRIVER).is_file()),
                                reason="needs Debian's chromium and chromium-driver (make setup installs them)")


@pytest.fixture(scope="module")
def url(tiny_model_dir, strong_adapter, tmp_path_factory):
    from tunepipe.serve.app import create_app
    from tunepipe.serve.server import build_served
    from tunepipe.serve.webchat import add_webchat

    served = build_served(serve_config(tiny_model_dir, strong_adapter, **{"eval.max_new_tokens": 24}),
                          Layout.at(tmp_path_factory.mktemp("webchat")), model_name="tiny")
    app = create_app(served)
    add_webchat(app, served)
    with running(app, served) as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,640", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_page_streams_the_answer_the_api_gives(url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    browser.find_element(By.ID, "system").send_keys("You are Tuney.")
    browser.find_element(By.ID, "question").send_keys("Who are you?\n")
    wait = WebDriverWait(browser, 60)
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".assistant[data-done='1']"))
    shown = answer.text
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    want = client.chat.completions.create(model="tiny", temperature=0, top_p=1, max_tokens=24, messages=[
        {"role": "system", "content": "You are Tuney."}, {"role": "user", "content": "Who are you?"}])
    assert shown and shown == want.choices[0].message.content.strip()
    assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Who are you?"
    assert browser.save_screenshot(str(tmp_path / "webchat.png"))
    assert (tmp_path / "webchat.png").read_bytes().startswith(b"\x89PNG")
    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
