"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium;
nothing is downloaded): send a message, watch the reply stream in, stop it, keep the conversation. And
what a page on another site, or a DNS-rebinding page, can do to the server from the same browser: run
nothing and read nothing."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from mobillama.infer.generator import Generator

from .conftest import FakeGenerator, live, wait_until

CHROMIUM = Path("/usr/bin/chromium")
REBIND_NAME = "rebind.test"
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
        f"--host-resolver-rules=MAP {REBIND_NAME} 127.0.0.1",  # a DNS-rebinding name, without DNS
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


ATTACK = """
const [target, done] = arguments;
const body = JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 3});
const url = target + "/v1/chat/completions";
const out = {};
(async () => {
  try {  // a CORS "simple request": no preflight, the browser sends it and hides the answer
    out.simple = (await fetch(url, {method: "POST", body, mode: "no-cors"})).type;
  } catch (e) { out.simple = "blocked"; }
  try {  // JSON needs a preflight, which the server does not grant
    out.json = await (await fetch(url, {method: "POST", body, headers: {"Content-Type": "application/json"}})).text();
  } catch (e) { out.json = "blocked"; }
  try { out.read = await (await fetch(target + "/v1/models")).text(); } catch (e) { out.read = "blocked"; }
  const frame = document.createElement("iframe");  // a plain HTML form, posted into a hidden frame
  frame.name = "sink";
  document.body.appendChild(frame);
  const form = document.createElement("form");
  Object.assign(form, {method: "POST", action: url, enctype: "text/plain", target: "sink"});
  const field = document.createElement("input");
  Object.assign(field, {name: body.slice(0, -1) + ', "user": "', value: '"}'});  // body: {...,"user": "="}
  form.appendChild(field);
  document.body.appendChild(form);
  form.submit();
  done(out);
})();
"""


def _chat_statuses(caplog) -> list[tuple[str, int]]:
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mobillama.serve.access"]
    return [(r["method"], r["status"]) for r in records if r["path"] == "/v1/chat/completions"]


def test_a_page_on_another_site_cannot_drive_the_server(browser, caplog):
    caplog.set_level(logging.INFO, logger="mobillama.serve.access")
    target = FakeGenerator()
    with live(target) as s, live(FakeGenerator()) as other:
        browser.get(other.url + "/")  # another origin (another port): the attacker's page
        out = browser.execute_async_script(ATTACK, s.url)
        assert out["json"] == "blocked" and out["read"] == "blocked", out
        # the simple request and the form reached the server and were refused; the preflight too
        assert wait_until(lambda: [m for m, _ in _chat_statuses(caplog)].count("POST") == 2, 10)
        assert all(status in (403, 415) for _, status in _chat_statuses(caplog)), _chat_statuses(caplog)
        assert target.started == []  # nothing was generated


def test_a_dns_rebinding_page_is_refused(browser, caplog):
    target = FakeGenerator()
    with live(target) as s:
        browser.get(f"http://{REBIND_NAME}:{s.port}/")  # the name now resolves to 127.0.0.1
        assert "host_not_allowed" in browser.page_source
        # from that page the server is "same-origin", so the browser would let it read the answers
        out = browser.execute_async_script(
            "const done = arguments[0];"
            "fetch('/v1/models').then(r => r.text()).then(done, e => done('blocked'));"
        )
        assert "host_not_allowed" in out
        assert target.started == []
        browser.get(s.url + "/")  # the same server under its own address: the chat page
        assert browser.title == "mobillama chat"
