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


def test_a_session_goes_on_after_its_first_answer(browser, short_run, sample_dir):
    """What a person does after the first answer: reads the headline, moves the opacity control, comes
    back after the upload has been deleted and presses Analyse again, then uploads a second frame. Bugs
    it catches: the opacity control redrawing nothing, "Analyse" again failing once the upload is gone
    (the session's copy not used), a second upload answered with the first one's result."""
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from thyroid_classifier.app import build_demo, load_predictors

    out, _ = short_run
    demo = build_demo(load_predictors([str(out / "tiny-resnet")]), forget_uploads_after=1.0)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    wordings = ("at 95% confidence", "cannot tell", "Cannot tell", "Not reliable")
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{demo.server_port}/")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))

        def body() -> str:
            return browser.find_element(By.TAG_NAME, "body").text

        def shown() -> list[str]:  # the slider's two images served by the app
            return sorted(i.get_attribute("src") for i in browser.find_elements(By.TAG_NAME, "img")
                          if "gradio_api/file" in (i.get_attribute("src") or "") and i.is_displayed())

        def analyse(previous: list[str]) -> list[str]:
            wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Analyse']"))).click()
            wait.until(lambda d: len(shown()) >= 2 and shown() != previous)
            wait.until(lambda d: any(t in body() for t in wordings))
            return shown()

        def upload(path: Path) -> None:
            browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"img[src*='{path.stem}']"))

        upload(sample_dir / "malignant" / "3000_1.png")
        first = analyse([])
        text = body()
        assert "The heatmap shows the regions that raised the score of" in text and "Error" not in text
        # The headline is one of the rule's answers, with its reason under it (never a bare label and number).
        assert any(t in text for t in wordings)

        # The opacity control: its thumb moved with the keyboard, the overlay is drawn again.
        thumb = browser.find_element(By.CSS_SELECTOR, "input[type=range]")
        thumb.click()
        for _ in range(6):
            thumb.send_keys(Keys.ARROW_RIGHT)
        browser.execute_script("arguments[0].dispatchEvent(new Event('pointerup', {bubbles: true}));"
                               "arguments[0].dispatchEvent(new Event('mouseup', {bubbles: true}));", thumb)
        wait.until(lambda d: len(shown()) >= 2 and shown() != first)
        redrawn = shown()

        # A while later the upload is deleted from the server; Analyse again still answers, from the session's copy
        # (the same frame at the same opacity: the same images, so wait for an error long enough to be sure there is none).
        time.sleep(2.5)
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Analyse']"))).click()
        clicked = time.monotonic()
        WebDriverWait(browser, 30).until(lambda d: "Error" in body() or time.monotonic() - clicked > 5)
        text = body()
        assert "upload has expired" not in text and "Error" not in text and any(t in text for t in wordings)
        again = shown()
        assert len(again) >= 2

        # A second frame in the same session gets its own answer and images.
        upload(sample_dir / "benign" / "2000_1.png")
        second = analyse(again)
        assert second != again and "Error" not in body()
        assert demo.server_port  # still serving
    finally:
        demo.close()


def test_two_clicks_on_the_uploaded_image_give_the_nodule_box_in_its_pixels(browser, short_run, sample_dir, tmp_path):
    """A person marks the nodule by clicking two opposite corners on the image: the box field gets them in the image's
    own pixels (not the page's), and Analyse reads the descriptors from it. Bugs: page pixels taken for image pixels
    (the upload is shown larger than it is), the second click starting a new box, the box not reaching the model."""
    import shutil as sh

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from thyroid_classifier.app import build_demo, launch, load_predictors
    from thyroid_classifier.descriptors import DescriptorHeads, DescriptorState, pooled_width
    from thyroid_classifier.predict import Predictor

    out, _ = short_run
    folder = tmp_path / "with-heads"
    sh.copytree(out / "tiny-resnet", folder)
    DescriptorState(DescriptorHeads(pooled_width(Predictor.from_pretrained(str(folder)).model)), {}).save_pretrained(folder)
    demo = build_demo(load_predictors([str(folder)]))
    launch(demo, "127.0.0.1", None, share=False, prevent_thread_lock=True)  # as app.py launches it (with the page's CSS)
    frame = sample_dir / "malignant" / "3000_1.png"  # 128 x 96 pixels, in a frame larger than that
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{demo.server_port}/")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(frame))
        shown = wait.until(lambda d: next((i for i in d.find_elements(By.CSS_SELECTOR, "img[src*='3000_1']") if i.is_displayed()), None))
        wait.until(lambda d: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", shown))
        width, height = shown.size["width"], shown.size["height"]
        assert width > 128 * 1.5  # its frame is larger than its pixels ...
        assert browser.execute_script("return getComputedStyle(arguments[0]).objectFit", shown) == "scale-down"  # ... and it is not enlarged
        scale = min(width / 128, height / 96, 1)  # what is drawn: the image at this scale, centred in the element
        box_field = browser.find_element(By.XPATH, "//label[contains(., 'Nodule box')]//textarea | //label[contains(., 'Nodule box')]//input")
        for fx, fy in ((0.25, 0.3), (0.75, 0.8)):  # where on the drawn image, as offsets from its centre in page pixels
            ActionChains(browser).move_to_element_with_offset(shown, round((fx - 0.5) * 128 * scale), round((fy - 0.5) * 96 * scale)).click().perform()
            wait.until(lambda d, fx=fx: box_field.get_attribute("value").count(",") == (1 if fx < 0.5 else 3))
        values = [float(v) for v in box_field.get_attribute("value").split(",")]
        assert values == pytest.approx([0.25 * 128, 0.3 * 96, 0.75 * 128, 0.8 * 96], abs=3)
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Analyse']"))).click()
        wait.until(lambda d: "Read from the nodule box given" in d.find_element(By.TAG_NAME, "body").text)
    finally:
        demo.close()
