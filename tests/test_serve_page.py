"""The web page of `adapterkit serve` in headless Chromium (selenium + Debian's chromium-driver): upload an image,
edit, the output appears and its bytes equal the API's for the same arguments; the compare view shows the base and
every adapter (issue 14)."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from adapterkit.testing import random_image

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
requests = pytest.importorskip("requests")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")

READ_IMAGE = """
const done = arguments[arguments.length - 1];
fetch(arguments[0].src).then(r => r.arrayBuffer()).then(b => {
  let s = ""; new Uint8Array(b).forEach(x => { s += String.fromCharCode(x); }); done(btoa(s));
}).catch(e => done("error: " + e));
"""


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_page_uploads_edits_and_shows_the_apis_output(served, browser, tmp_path):
    path = tmp_path / "upload.png"
    random_image(5).save(path)
    browser.get(served["url"] + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) == 5)  # auto, base + 3 adapters
    browser.find_element(By.ID, "image-file").send_keys(str(path))
    _set(browser, "instruction", "cartoonize the image")
    Select(browser.find_element(By.ID, "adapter")).select_by_value("cartoonize")
    _set(browser, "seed", "3")
    _set(browser, "steps", "2")
    browser.find_element(By.ID, "edit").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text in ("done", "") and d.find_element(By.ID, "output").get_attribute("src"))
    assert browser.find_element(By.ID, "error").get_attribute("hidden"), browser.find_element(By.ID, "error").text
    output = browser.find_element(By.ID, "output")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", output) == 64
    shown = base64.b64decode(browser.execute_async_script(READ_IMAGE, output))
    api = requests.post(served["url"] + "/v1/edit", files={"image": ("in.png", path.read_bytes(), "image/png")},
                        data={"instruction": "cartoonize the image", "adapter": "cartoonize", "seed": "3", "steps": "2"}, timeout=120)
    assert api.status_code == 200 and shown == api.content
    assert "cartoonize" in browser.find_element(By.ID, "route").text and " ms" in browser.find_element(By.ID, "route").text

    browser.find_element(By.ID, "compare").click()  # base vs every adapter, sent together
    wait.until(lambda d: d.find_element(By.ID, "status").text == "compare done")
    images = browser.find_elements(By.CSS_SELECTOR, "#compare-grid img")
    assert [i.get_attribute("data-adapter") for i in images] == ["base", "derain", "cartoonize", "denoise"]
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 64 for i in images)
    compared = base64.b64decode(browser.execute_async_script(READ_IMAGE, images[2]))
    difference = np.abs(_pixels(compared) - _pixels(api.content)).max()
    assert difference <= 1  # the compare view's cartoonize column is the same edit (batched with 3 others: <= 1/255)


def test_page_shows_the_servers_one_line_error(served, browser, tmp_path):
    path = tmp_path / "odd.png"
    path.write_text("this is not a picture")  # named like one: the browser sends it, the server refuses it
    browser.get(served["url"] + "/")
    WebDriverWait(browser, 60).until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) >= 2)
    browser.find_element(By.ID, "image-file").send_keys(str(path))
    _set(browser, "instruction", "derain the image")
    browser.find_element(By.ID, "edit").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").text)
    assert "HTTP 400" in browser.find_element(By.ID, "error").text and "not an image" in browser.find_element(By.ID, "error").text


def test_first_visit_shows_a_sample_and_can_edit_at_once(served, browser):
    """Session 22: a first visit showed two broken-image icons and an empty '(none)' input; the first bundled sample
    is now chosen and previewed, the output stays hidden until there is one, and Edit works without an upload."""
    browser.get(served["url"] + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "input-figure").is_displayed())
    assert Select(browser.find_element(By.ID, "sample")).first_selected_option.get_attribute("value") != ""
    preview = browser.find_element(By.ID, "input-preview")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview) > 0)
    assert not browser.find_element(By.ID, "output-figure").is_displayed()
    _set(browser, "steps", "2")
    browser.find_element(By.ID, "edit").click()
    wait.until(lambda d: d.find_element(By.ID, "output-figure").is_displayed() or d.find_element(By.ID, "error").text)
    assert not browser.find_element(By.ID, "error").text and browser.find_element(By.ID, "status").text == "done"
