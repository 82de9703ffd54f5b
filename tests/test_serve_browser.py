"""The page in a real browser: headless Chromium (Debian's chromium + chromedriver, driven by selenium) loads
it, sends a message, sees the streamed reply, hovers a token, opens its autopsy, submits a ranking and finds it
in the preference file. Screenshots go to $GLASSMIND_TEST_ARTIFACTS (default: the test's tmp dir).

Under CI (CI=true) a missing browser is a failure, not a skip."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixture import LiveServer, make_app, tiny_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


def need_browser():
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install 'glassmind[test]')")
    for path in (CHROMIUM, DRIVER):
        if not os.path.exists(path):
            missing.append(path + " (apt-get install chromium chromium-driver)")
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the browser test must run under CI; missing: " + ", ".join(missing))
        pytest.skip("no browser: " + ", ".join(missing))


@pytest.fixture
def artifacts(tmp_path):
    d = Path(os.environ.get("GLASSMIND_TEST_ARTIFACTS") or tmp_path / "artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_a_browser_chats_hovers_opens_the_autopsy_and_ranks(tmp_path, artifacts, monkeypatch):
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    app, served = make_app(tmp_path, models={"tiny": tiny_run(), "long": tiny_run(context=1024)})
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900"):
        opts.add_argument(a)
    with LiveServer(app) as srv:
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(srv.url + "/")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            # a message with markup in it, at temperature 0: the page's reply must equal the API's
            message = 'Hello <img src=x onerror="window.pwned=1"> world'
            for field, value in (("temperature", "0"), ("max-tokens", "12")):
                box = driver.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            driver.find_element(By.ID, "prompt").send_keys(message)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"))
            user = driver.find_element(By.CSS_SELECTOR, ".msg.user .body")
            assert user.text == message and not driver.find_elements(By.CSS_SELECTOR, "#messages img")
            assert driver.execute_script("return window.pwned === undefined")
            spans = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .tok")
            assert len(spans) == 12
            shown = "".join(driver.execute_script("return Array.from(document.querySelectorAll("
                                                  "'.msg.assistant .tok'), s => s.textContent)"))
            import httpx

            ref = httpx.post(srv.url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": message}], "max_tokens": 12,
                "temperature": 0}, timeout=60).json()["choices"][0]["message"]["content"]
            assert shown == ref
            assert all("rgba" in s.get_attribute("style") for s in spans)
            # hover: the alternatives
            ActionChains(driver).move_to_element(spans[2]).perform()
            tip = driver.find_element(By.ID, "tooltip")
            wait.until(lambda d: tip.is_displayed())
            assert "p=" in tip.text and len(tip.text.splitlines()) == 6      # the token + 5 alternatives
            driver.save_screenshot(str(artifacts / "serve-chat-hover.png"))
            # click: the autopsy of that position
            spans[2].click()
            wait.until(EC.visibility_of_element_located((By.ID, "autopsy-body")))
            narration = driver.find_element(By.ID, "narration").text
            assert narration.strip()
            lens_rows = driver.find_elements(By.CSS_SELECTOR, "#lens tr")
            # a header, the embeddings, then one row per block (the real autopsy's logit lens)
            assert len(lens_rows) == served[0].model.config.n_layers + 2
            driver.save_screenshot(str(artifacts / "serve-autopsy.png"))
            # rank: sample, order (a tie), submit, and find it in the preference file
            driver.find_element(By.ID, "tab-rank").click()
            assert not driver.find_element(By.ID, "view-chat").is_displayed()   # one view at a time
            assert driver.find_element(By.ID, "view-rank").is_displayed()
            driver.find_element(By.ID, "rank-prompt").send_keys("Say hello")
            driver.find_element(By.ID, "rank-sample").click()
            wait.until(lambda d: d.find_element(By.ID, "rank-submit").is_enabled())
            inputs = driver.find_elements(By.CSS_SELECTOR, ".rank-input")
            shown_replies = driver.execute_script("return Array.from(document.querySelectorAll("
                                                  "'#rank-replies li span'), s => s.textContent)")
            ranks = [1] + [2] * (len(inputs) - 1)
            for box, r in zip(inputs, ranks):
                box.clear()
                box.send_keys(str(r))
            driver.find_element(By.ID, "rank-submit").click()
            wait.until(lambda d: "saved" in d.find_element(By.ID, "rank-status").text)
            driver.save_screenshot(str(artifacts / "serve-rank.png"))
            [record] = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
            assert record["prompt"] == [{"role": "user", "content": "Say hello"}] and record["ranking"] == ranks
            assert record["responses"] == shown_replies
            # the scheduler view, while a long request decodes
            import threading

            busy = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", json={
                "model": "long", "prompt": "a", "max_tokens": 1000, "ignore_eos": True}, timeout=120))
            busy.start()
            driver.find_element(By.ID, "tab-sched").click()
            wait.until(lambda d: "long: 1/16 slots busy" in d.find_element(By.ID, "sched-summary").text)
            row = driver.find_element(By.CSS_SELECTOR, "#sched-slots tbody tr").text
            assert row.startswith("long 0 completions-")
            driver.save_screenshot(str(artifacts / "serve-scheduler.png"))
            busy.join()
        finally:
            driver.quit()
