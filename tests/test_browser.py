"""End to end in headless Chromium: upload an image, ask for a prediction, see the label and heatmap."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import REPO

SCREENSHOT = REPO / "outputs" / "screenshots" / "app_e2e.png"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("Chromium and chromedriver are not installed here (Debian: apt-get install chromium chromium-driver); CI installs them")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def test_upload_predict_and_see_label_and_heatmap(browser, short_run, sample_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from thyroid_classifier.app import build_demo, load_predictors

    out, results = short_run
    demo = build_demo(load_predictors([str(out / name) for name in results]))
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{demo.server_port}/")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        assert "not a diagnosis" in browser.find_element(By.TAG_NAME, "body").text
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(sample_dir / "malignant" / "3000_1.png"))
        button = wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Analyse']")))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img[src*='3000_1'], img[src*='gradio_api/file']"))
        button.click()
        # One of the answers: a label, "A or B: cannot tell", "Cannot tell" or "Not reliable" (the tiny models' sets are wide).
        wait.until(lambda d: any(t in d.find_element(By.TAG_NAME, "body").text for t in ("at 95% confidence", "cannot tell", "Cannot tell", "Not reliable")))
        body = browser.find_element(By.TAG_NAME, "body").text
        assert any(f"{label}" in body for label in ("normal", "benign", "malignant"))
        assert "%" in body  # the confidences
        # The heatmap: the slider shows two result images served by the app.
        wait.until(lambda d: len([i for i in d.find_elements(By.TAG_NAME, "img") if "gradio_api/file" in (i.get_attribute("src") or "") and i.is_displayed()]) >= 2)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size > 10_000
    finally:
        demo.close()
