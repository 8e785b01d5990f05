"""The chat page at `/` in a real headless browser (Debian's chromium and chromedriver, which `.ci/run`
installs): streamed answers equal `model.chat`, images by upload and by drag-and-drop, multi-turn, stop."""
import base64
import os
import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_helpers import ServerThread  # noqa: E402

from mindxcomposer.serve import create_app, make_engine  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CAT = os.path.join(HERE, "assets", "chelsea_tiny.png")
STRIP = os.path.join(HERE, "assets", "rocket_strip_8x1.png")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# CI installs the browser (.ci/run): there a missing one is a failure, not a skip
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture(scope="module")
def page(demo_model):
    engine = make_engine(demo_model, max_batch=2, max_queue=4).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        with ServerThread(create_app(demo_model, engine, "ixc-demo")) as srv:
            driver.get(srv.url + "/")
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "ixc-demo")
            srv.driver, srv.engine = driver, engine
            yield srv
    finally:
        driver.quit()
        engine.stop()


def _settings(driver, max_tokens, temperature=0):
    for field, value in (("max-tokens", max_tokens), ("temperature", temperature)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))


def _send(driver, text):
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    bubble = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    WebDriverWait(driver, 120).until(lambda d: bubble.get_attribute("data-done") == "1")
    assert "error" not in bubble.get_attribute("class"), bubble.text
    return bubble.find_element(By.CLASS_NAME, "text").get_attribute("textContent")


def _drop(driver, path):
    """Drops a PNG file on the page as a user dragging it from the desktop would."""
    with open(path, "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], arguments[1], {type: "image/png"}));
        const zone = document.getElementById("dropzone");
        zone.dispatchEvent(new DragEvent("dragover", {bubbles: true, dataTransfer: dt}));
        zone.dispatchEvent(new DragEvent("drop", {bubbles: true, dataTransfer: dt}));
    """, b64, os.path.basename(path))


def _chat(model, query, **kw):
    return model.chat(model.tokenizer, query, do_sample=False, **kw)[0]


def test_multi_turn_with_uploaded_and_dropped_images(page, demo_model):
    d = page.driver
    d.find_element(By.ID, "new-chat").click()
    _settings(d, 8)
    d.find_element(By.ID, "file").send_keys(CAT)
    _drop(d, STRIP)
    WebDriverWait(d, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 2)
    first = _send(d, "Compare these.")
    second = _send(d, "And now?")
    assert first == _chat(demo_model, "<ImageHere><ImageHere>Compare these.", image=[CAT, STRIP], max_new_tokens=8)
    assert second == _chat(demo_model, "And now?", image=[CAT, STRIP], max_new_tokens=8,
                           history=[("<ImageHere><ImageHere>Compare these.", first)])
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 2


def test_stop_button_ends_the_answer_and_frees_the_row(page, demo_model):
    d = page.driver
    d.find_element(By.ID, "new-chat").click()
    _settings(d, 3000)
    d.find_element(By.ID, "prompt").send_keys("Tell me everything.")
    d.find_element(By.ID, "send").click()
    bubble = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    WebDriverWait(d, 60).until(lambda d: len(bubble.text) > 20)  # streaming
    d.find_element(By.ID, "stop").click()
    WebDriverWait(d, 10).until(lambda d: bubble.get_attribute("data-done") == "1")
    assert bubble.get_attribute("data-stopped") == "1"
    stopped = bubble.find_element(By.CLASS_NAME, "text").get_attribute("textContent")
    deadline = time.monotonic() + 10
    while page.engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not page.engine.active  # the server stopped decoding it
    full = _chat(demo_model, "Tell me everything.", max_new_tokens=600)  # more than it streamed before the stop
    assert full.startswith(stopped) and len(stopped) < len(full)
    assert not d.find_element(By.ID, "send").get_attribute("disabled")
