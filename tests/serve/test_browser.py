"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium;
nothing is downloaded): send a message, watch the reply stream in, stop it, keep the conversation."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pytest

from mobillama.generate import Generator

from .conftest import live, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() or not Path(CHROMEDRIVER).exists(),
    reason="needs Debian's chromium and chromium-driver (scripts/ci_system_deps.sh installs them)",
)


class PacedGenerator(Generator):
    """The real Generator, slowed to a human-visible pace so the page can be watched and stopped (and not
    ended early by a random model's EOS: the reply must still be running when Stop is pressed)."""

    def iter_ids(self, prompt_ids, params):
        self.closed_early = getattr(self, "closed_early", 0)
        inner = super().iter_ids(prompt_ids, dataclasses.replace(params, stop_at_eos=False, stop=()))
        finished = False
        try:
            while True:
                time.sleep(0.02)
                try:
                    item = next(inner)
                except StopIteration as done:
                    finished = True
                    return done.value
                yield item
        finally:
            if not finished:
                self.closed_early += 1


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_streams_stops_and_keeps_the_conversation(browser, real_generator):
    from selenium.webdriver.common.by import By

    paced = PacedGenerator(real_generator.model, real_generator.tokenizer)
    with live(paced, api_key="page-key", max_concurrency=1) as s:
        browser.get(s.url + "/")
        assert browser.title == "mobillama chat"
        browser.find_element(By.ID, "api-key").send_keys("page-key")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("200")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("1")

        def reply():
            replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            return replies[-1] if replies else None

        browser.find_element(By.ID, "input").send_keys("hello there")
        browser.find_element(By.ID, "send").click()
        assert wait_until(lambda: reply() is not None and len(reply().text) > 0, 30), "no streamed text"
        first = len(reply().text)
        assert wait_until(lambda: len(reply().text) > first, 30), "the text did not grow while streaming"
        assert browser.find_element(By.ID, "stop").is_enabled()
        assert "tokens/s" in browser.find_element(By.ID, "stats").text

        browser.find_element(By.ID, "stop").click()
        assert wait_until(lambda: reply().get_attribute("data-state") == "stopped", 10)
        stopped_text = reply().get_attribute("textContent")  # exact text (.text normalizes whitespace)
        assert wait_until(lambda: paced.closed_early == 1, 10), "the server kept generating after Stop"
        time.sleep(0.3)
        assert reply().get_attribute("textContent") == stopped_text  # nothing more arrives
        assert "stopped" in browser.find_element(By.ID, "stats").text
        assert browser.find_element(By.ID, "send").is_enabled()

        # The conversation continues: the second request carries both earlier turns.
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("3")
        browser.find_element(By.ID, "input").send_keys("and again")
        browser.find_element(By.ID, "send").click()
        assert wait_until(lambda: reply().get_attribute("data-state") in ("done", "error"), 30)
        assert reply().get_attribute("data-state") == "done", reply().text
        bubbles = browser.find_elements(By.CSS_SELECTOR, ".msg")
        assert [b.get_attribute("class") for b in bubbles] == ["msg user", "msg assistant"] * 2
        history = browser.execute_script("return conversation")
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert history[1]["content"] == stopped_text
        assert "finish" in browser.find_element(By.ID, "stats").text


def test_page_shows_errors_from_the_server(browser, real_generator):
    from selenium.webdriver.common.by import By

    with live(real_generator, api_key="right") as s:
        browser.get(s.url + "/")
        browser.find_element(By.ID, "api-key").send_keys("wrong")
        browser.find_element(By.ID, "input").send_keys("hi")
        browser.find_element(By.ID, "send").click()
        assert wait_until(lambda: bool(browser.find_elements(By.CSS_SELECTOR, ".msg.error")), 20)
        assert "incorrect API key" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
