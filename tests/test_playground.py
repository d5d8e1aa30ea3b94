"""The playground page at `/`, driven in headless Chromium (skipped when no browser is present)."""

import os
import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(tiny_models):
    from slmkit.serve import start_server

    s = start_server([tiny_models["llama"], tiny_models["qwen2"]], names=["teacher", "student"],
                     api_key="pg-key")
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1200,900"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def wait_for(drv, cond, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(lambda d: cond(d))


def test_chat_and_side_by_side(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    def el(i):
        return browser.find_element(By.ID, i)

    browser.get(server.url + "/")
    # the server wants a key: the page shows the field and lists no models until it has one
    wait_for(browser, lambda d: el("key-box").is_displayed())
    el("api-key").send_keys("pg-key")
    el("tab-chat").click()  # blur the field, which fires `change`
    wait_for(browser, lambda d: len(el("chat-model").find_elements(By.TAG_NAME, "option")) == 2)

    el("chat-input").send_keys("Hello there")
    el("chat-send").click()
    wait_for(browser, lambda d: "tokens/s" in el("chat-stats").text)
    msgs = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg")
    assert [m.get_attribute("class").split()[1] for m in msgs] == ["user", "assistant"]
    assert msgs[0].text.endswith("Hello there")
    assert "error" not in msgs[1].find_element(By.TAG_NAME, "span").get_attribute("class")
    # the page's text is what the server generates for the same request (greedy here)
    el("chat-reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg") == []

    el("tab-compare").click()
    assert el("compare").is_displayed() and not el("chat").is_displayed()
    assert el("cmp-a").get_attribute("value") == "teacher"
    assert el("cmp-b").get_attribute("value") == "student"
    el("cmp-prompt").send_keys("Summarize the conversation")
    el("cmp-max").clear()
    el("cmp-max").send_keys("32")
    el("cmp-send").click()
    wait_for(browser, lambda d: "tokens/s" in el("stats-a").text and "tokens/s" in el("stats-b").text)

    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="pg-key")
    for side, model in (("a", "teacher"), ("b", "student")):
        stats = el(f"stats-{side}").text
        assert "latency" in stats and "first token" in stats
        want = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Summarize the conversation"}],
            temperature=0, max_tokens=32).choices[0].message.content
        assert el(f"out-{side}").get_attribute("textContent") == want
    shot = os.environ.get("SLM_PLAYGROUND_SCREENSHOT") or str(tmp_path / "playground.png")
    assert browser.save_screenshot(shot)
