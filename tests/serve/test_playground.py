"""The playground in a real headless Chromium, driven by selenium: type a message, send it, watch the
reply stream in (engine steps are slowed so that streaming is visible), the reasoning shown apart."""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest

import gptlab
from gptlab.serve.app import ServeConfig, create_app
from tests.serve.conftest import running

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and DRIVER):
        pytest.fail("chromium and chromedriver are needed (apt-get install chromium chromium-driver; .ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="gptlab-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_type_send_and_see_the_reply_stream_in(reasoner, browser, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from gptlab.infer.engine import Engine

    step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: (time.sleep(0.05), step(self))[1])  # visible streaming
    model, tok = gptlab.load(reasoner), gptlab.load_tokenizer(reasoner)
    with running(create_app(ServeConfig(model="reasoner", api_key="page-key"), model, tok)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        browser.find_element(By.ID, "key").send_keys("page-key")
        browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "reasoner"))
        browser.execute_script("document.getElementById('temperature').value = 0")  # greedy
        box = browser.find_element(By.ID, "input")
        box.send_keys("What is a tuple?")
        browser.find_element(By.ID, "send").click()
        wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".msg.user"), "What is a tuple?"))
        seen = []  # the reply's visible text, sampled while it streams
        deadline = time.time() + 60
        while time.time() < deadline:
            reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
            seen.append(reply.get_attribute("textContent"))
            if browser.find_element(By.ID, "send").is_enabled() and seen[-1]:
                break  # finished
            time.sleep(0.05)
        partial = [s for s in seen if s and s != seen[-1]]
        assert partial, "the reply appeared all at once, not streamed"
        assert all(seen[-1].startswith(p[: len(p) // 2]) for p in partial[:3])
        details = browser.find_element(By.CSS_SELECTOR, ".msg.assistant details.reasoning")
        assert details.get_attribute("hidden") is None  # the model reasoned: shown apart, collapsed
        assert "Okay," in details.get_attribute("textContent")
        answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .answer").get_attribute("textContent")
        assert answer.strip() and "<think>" not in answer and "tokens in" in browser.find_element(By.ID, "stats").text
