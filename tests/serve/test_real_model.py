"""The server and its chat page on the real SmolLM2-135M-Instruct: the right answer comes back.

With random weights any text passes; with the real model a doubled BOS, a wrong template or a missed
end-of-turn token shows as a wrong or run-on answer.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from .conftest import live, wait_until
from .test_browser import CHROMEDRIVER, CHROMIUM, browser  # noqa: F401  (the headless Chromium fixture)


@pytest.fixture(scope="module")
def real_generator(real_model):
    from mobillama.serve.server import load_generator

    return load_generator(real_model[1], dtype="fp32")


def test_chat_completion_answers_and_stops_at_end_of_turn(real_generator):
    with live(real_generator) as s:
        body = {
            "messages": [{"role": "user", "content": "What is the capital of Japan?"}],
            "temperature": 0,
            "max_tokens": 60,
        }
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert "Tokyo" in choice["message"]["content"]
        assert choice["finish_reason"] == "stop"  # ended at <|im_end|>, not at the token limit
        assert "<|im_end|>" not in choice["message"]["content"]
        assert "<|im_start|>" not in choice["message"]["content"]


@pytest.mark.skipif(
    not CHROMIUM.exists() or not Path(CHROMEDRIVER).exists(),
    reason="needs Debian's chromium and chromium-driver (scripts/ci_system_deps.sh installs them)",
)
def test_chat_page_answers_in_the_browser(browser, real_generator):  # noqa: F811
    from selenium.webdriver.common.by import By

    with live(real_generator) as s:
        browser.get(s.url + "/")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "input").send_keys("What is the capital of Japan?")
        browser.find_element(By.ID, "send").click()

        def reply():
            replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            return replies[-1] if replies else None

        assert wait_until(lambda: reply() is not None and reply().get_attribute("data-state") == "done", 120)
        assert "Tokyo" in reply().text
