"""The web page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven
by Selenium with the system driver: nothing is downloaded).

A Turkish prompt goes in; the page must show intermediate canvases (masked slots filling in,
block by block), then the final answer, identical to the library's for the same settings. The
page speaks Turkish, and its defaults are the CLI's (seed 0, turn N with seed + N).
Screenshots are saved under ``artifacts/`` (mid-denoising, final, replay, phone width).
Skipped, with the reason printed, only where Chromium or its driver is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from diffutron.serve import create_app, serve_in_thread
from diffutron.tiny import tiny_lm

from test_serve import Recording

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PROMPT = "Türkiye'nin başkenti neresidir?"
EMPTY_ANSWER = "(boş yanıt: model sırasını hemen bitirdi)"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--disable-extensions", "--window-size=1280,900", "--lang=tr-TR"]


def _skip(reason: str):
    print(f"\n[test_serve_browser] SKIPPED: {reason}", file=sys.__stderr__, flush=True)
    pytest.skip(reason)



@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        _skip(f"Chromium not installed ({CHROMIUM}, {DRIVER}); .ci/run installs Debian's chromium and chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _skip("selenium is not installed (pip install -e '.[test]')")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        drv = webdriver.Chrome(service=Service(DRIVER), options=options)
    except Exception as err:  # noqa: BLE001 - a broken browser install is a skip, with the reason
        _skip(f"Chromium did not start: {str(err).splitlines()[0]}")
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def page(lm):
    app = create_app(Recording(lm, delay=0.025), served_model_name="tiny")  # ~25 ms a step: watchable
    with serve_in_thread(app) as url:
        yield url


def _wait(drv, condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = drv.execute_script(condition)
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _set(drv, element_id, value):
    drv.execute_script("const el = document.getElementById(arguments[0]); el.value = arguments[1];"
                       "el.dispatchEvent(new Event('change'));", element_id, value)


def test_page_shows_the_answer_denoising_live(driver, page, lm):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    driver.set_window_size(1280, 900)
    driver.get(page + "/")
    _wait(driver, "return document.getElementById('model').textContent === 'tiny'", what="the model name")
    assert driver.find_element(By.ID, "settings").is_displayed()  # wide screen: settings beside the chat
    _set(driver, "seed", "7")
    _set(driver, "max_tokens", "48")
    _set(driver, "block_length", "16")
    assert driver.find_element(By.ID, "steps").get_attribute("placeholder") == "48"  # the server's steps for 48 tokens

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(PROMPT)
    driver.find_element(By.ID, "send").click()

    # 1. intermediate states: some slots committed, some still masked, one block active
    _wait(driver, """
        const c = document.querySelector('.msg.assistant .canvas');
        return c && !c.hidden && c.querySelectorAll('.tok.masked').length > 8
            && c.querySelectorAll('.tok:not(.masked)').length >= 3 && c.querySelector('.block.active');
    """, what="a half-denoised canvas")
    driver.save_screenshot(str(ARTIFACTS / "serve_page_denoising.png"))
    assert driver.find_element(By.ID, "stop").is_displayed()

    # 2. the final answer
    _wait(driver, "return document.querySelector('.msg.assistant').dataset.state === 'done'", what="the answer")
    msg = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
    frames = int(msg.get_attribute("data-frames"))
    assert frames >= 10 and int(msg.get_attribute("data-max-masked")) >= 40
    text = msg.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
    expected = lm.generate(PROMPT, seed=7, max_new_tokens=48, steps=48, block_length=16)[0].text
    assert text == (expected or EMPTY_ANSWER)
    assert "token" in msg.find_element(By.CSS_SELECTOR, ".meta").text
    user = driver.find_element(By.CSS_SELECTOR, ".msg.user").get_attribute("textContent")
    assert user == PROMPT
    driver.save_screenshot(str(ARTIFACTS / "serve_page_final.png"))

    # 3. replay: scrub back to the middle of the denoising
    driver.execute_script("""
        const s = document.querySelector('.msg.assistant .scrub');
        s.value = String(Math.floor(Number(s.max) / 2)); s.dispatchEvent(new Event('input'));""")
    masked_mid = driver.execute_script("return document.querySelectorAll('.msg.assistant .canvas .tok.masked').length")
    assert 0 < masked_mid < 48
    driver.save_screenshot(str(ARTIFACTS / "serve_page_replay.png"))

    # 4. a second turn carries the history, with seed + 1 (as `diffutron chat`)
    box.send_keys("Kitap okumak")
    driver.find_element(By.ID, "send").click()
    _wait(driver, "const m = document.querySelectorAll('.msg.assistant'); return m.length === 2 && m[1].dataset.state === 'done'",
          what="the second answer")
    second = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1].find_element(By.CSS_SELECTOR, ".text")
    history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": expected},
               {"role": "user", "content": "Kitap okumak"}]
    assert second.get_attribute("textContent") == (
        lm.generate(history, seed=8, max_new_tokens=48, steps=48, block_length=16)[0].text or EMPTY_ANSWER)

    # 5. phone width: one column, nothing wider than the screen, the composer usable
    driver.set_window_size(390, 844)
    time.sleep(0.2)
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert not driver.find_element(By.ID, "settings").is_displayed()
    assert driver.find_element(By.ID, "send").is_displayed() and driver.find_element(By.ID, "prompt").is_displayed()
    driver.find_element(By.ID, "settings-toggle").click()
    assert driver.find_element(By.ID, "seed").is_displayed()
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    driver.find_element(By.ID, "settings-toggle").click()
    driver.save_screenshot(str(ARTIFACTS / "serve_page_phone.png"))

    # 6. no script errors and no content-security-policy violations
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_page_shows_api_errors(driver, page):
    from selenium.webdriver.common.by import By

    driver.set_window_size(1280, 900)
    driver.get(page + "/")
    _wait(driver, "return document.getElementById('model').textContent === 'tiny'", what="the model name")
    _set(driver, "steps", "100000")  # over the server's limit: a 422 shown in the chat
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    driver.find_element(By.ID, "send").click()
    _wait(driver, "return document.querySelector('.msg.assistant.error')", what="the error message")
    text = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .text").get_attribute("textContent")
    assert text.startswith("Geçersiz ayar (HTTP 422)") and "steps=100000" in text and "limit" in text
    assert driver.find_element(By.ID, "send").is_displayed()  # ready for the next try
    _set(driver, "steps", "")
    driver.execute_script("localStorage.clear()")


def test_page_defaults_are_the_clis_and_it_speaks_turkish(driver, page, lm):
    """With nothing set, the page shows the CLI's defaults and answers as `diffutron generate` /
    `chat` do (seed 0); its text is Turkish."""
    from selenium.webdriver.common.by import By

    from diffutron.cli import build_parser

    driver.set_window_size(1280, 900)
    driver.get(page + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(page + "/")
    _wait(driver, "return document.getElementById('model').textContent === 'tiny'", what="the model name")
    cli = build_parser().parse_args(["generate", "x"])
    shown = driver.execute_script(
        "const o = {}; for (const f of arguments[0]) o[f] = document.getElementById(f).placeholder; return o;",
        ["max_tokens", "steps", "block_length", "temperature", "top_p", "repetition_penalty", "cfg_scale", "seed"])
    assert {k: float(v) for k, v in shown.items()} == {
        "max_tokens": cli.max_new_tokens, "steps": cli.steps, "block_length": cli.block_length,
        "temperature": cli.temperature, "top_p": cli.top_p, "repetition_penalty": cli.repetition_penalty,
        "cfg_scale": cli.cfg_scale, "seed": 0}
    assert driver.find_element(By.ID, "remasking").get_attribute("value") == cli.remasking
    assert driver.find_element(By.ID, "threshold").get_attribute("placeholder").startswith("kapalı")

    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    driver.find_element(By.ID, "send").click()
    _wait(driver, "return document.querySelector('.msg.assistant').dataset.state === 'done'", what="the answer")
    expected = lm.generate(PROMPT, seed=cli.seed)[0].text  # every setting the CLI's (the second turn: see above)
    got = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .text").get_attribute("textContent")
    assert got == (expected or EMPTY_ANSWER)
    page_text = driver.execute_script("return document.body.innerText")
    for english in ("New chat", "Settings", "Send", "Sampler", "tokens", "steps", "replay", "hit max", "ended"):
        assert english not in page_text, english
    assert "Yeni sohbet" in page_text and "adım" in page_text
