"""The page in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
load it, upload an image, see k results, click one, see the new query."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_serve import build_index
from tests.test_serve_process import serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
]

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them with apt)",
)


def chromium(profile: Path):
    """Debian's headless Chromium under Selenium, with a fresh profile folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # A driver path given: Selenium Manager never runs, so nothing downloads a browser.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture
def browser(tmp_path: Path):
    pytest.importorskip("selenium.webdriver")
    driver = chromium(tmp_path / "chromium-profile")
    yield driver
    driver.quit()


def screenshot(index_dir: Path, query: Path, out: Path, profile: Path, k: int = 6) -> None:
    """The page after one query, as docs/serve.png shows it (and a phone-sized copy)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(profile)
    all_images_shown = (
        "return [...document.querySelectorAll('img')].filter(i => i.src)"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    try:
        with serving(index_dir, timeout=180) as base:
            for _ in range(2):  # the first query loads the model; the second is the picture
                driver.get(base + "/")
                wait = WebDriverWait(driver, 180)
                wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#info-table tr"))
                driver.find_element(By.ID, "k").clear()
                driver.find_element(By.ID, "k").send_keys(str(k))
                driver.find_element(By.ID, "file").send_keys(str(query))
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .tile")) == k)
            wait.until(lambda d: d.execute_script(all_images_shown))
            driver.set_window_size(1280, 640)
            driver.save_screenshot(str(out))
            driver.set_window_size(390, 844)
            driver.save_screenshot(str(out.with_name(out.stem + "-phone.png")))
    finally:
        driver.quit()


def test_page_uploads_an_image_shows_k_results_and_queries_by_a_click(
    browser, tmp_path: Path, small_model: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    photos, index_dir = build_index(tmp_path, small_model)
    wait = WebDriverWait(browser, 60)
    with serving(index_dir) as base:
        browser.get(base + "/")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#info-table tr"))
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("4")
        photo = sorted(photos.rglob("*.png"))[0]
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .tile")) == 4)
        assert photo.name in browser.find_element(By.ID, "query-title").text
        tiles = browser.find_elements(By.CSS_SELECTOR, "#results .tile")
        assert "d = " in tiles[0].text and tiles[0].find_element(By.TAG_NAME, "img")
        assert browser.find_elements(By.CSS_SELECTOR, "#classes li")  # the model has classes
        clicked = tiles[1].get_attribute("data-id")
        tiles[1].click()
        wait.until(seen.text_to_be_present_in_element((By.ID, "query-title"), f"(#{clicked})"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .tile")) == 4)
        ids = [
            t.get_attribute("data-id")
            for t in browser.find_elements(By.CSS_SELECTOR, "#results .tile")
        ]
        assert clicked not in ids  # by id: the query's own row is left out
        thumbs_loaded = (
            "return [...document.querySelectorAll('#results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        wait.until(lambda d: d.execute_script(thumbs_loaded))
        browser.find_element(By.CSS_SELECTOR, "nav button[data-view=browse]").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .tile")) == 12)
        first = browser.find_element(By.CSS_SELECTOR, "#grid .tile")  # its file's name shown
        assert first.get_attribute("title").rsplit("/", 1)[-1] in first.text


def test_duplicates_view_shows_a_group_and_a_click_queries_by_its_member(
    browser, tmp_path: Path, small_model: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from retrieval import Index, IndexOptions
    from retrieval.collection.clusters import default_cluster_count
    from tests.test_collection import make_collection

    files = make_collection(tmp_path / "photos")
    os.utime(files["copy"], ns=(10**18, 10**18))  # the copy is the older file (2001)
    Index.create(
        tmp_path / "idx", tmp_path / "photos", IndexOptions(weights=str(small_model))
    ).close()
    wait = WebDriverWait(browser, 90)
    with serving(tmp_path / "idx") as base:
        browser.get(base + "/")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#info-table tr"))
        # Opening the view finds the exact and the verified copies (no calibration needed).
        browser.find_element(By.CSS_SELECTOR, "nav button[data-view=duplicates]").click()
        wait.until(seen.text_to_be_present_in_element((By.ID, "dup-status"), "verified)"))
        groups = browser.find_elements(By.CSS_SELECTOR, "#dup-groups .group")
        assert len(groups) == 2 and "exact · 2 files" in groups[0].text
        assert "copy · 2 files" in groups[1].text and "re-encoded" in groups[1].text
        tiles = groups[0].find_elements(By.CSS_SELECTOR, ".tile")
        assert "keep" in tiles[0].get_attribute("class") and "same bytes" in tiles[1].text
        assert {t.get_attribute("title") for t in tiles} == {
            str(files["original"]),
            str(files["copy"]),
        }
        # "not a duplicate" on the copy: remembered, and the group is gone when asked again
        groups[1].find_element(By.CSS_SELECTOR, "button.not-duplicate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#dup-groups .group")) == 1)
        assert (
            "1 group (1 exact, 0 verified copies)" in browser.find_element(By.ID, "dup-status").text
        )
        from retrieval.duplicates.memory import DuplicatesMemory

        memory = DuplicatesMemory(tmp_path / "idx")
        assert len(memory.not_duplicates()) == 1  # kept beside the index, by content
        memory.close()
        Select(browser.find_element(By.ID, "keep")).select_by_value("oldest")
        lead = "return document.querySelector('#dup-groups .tile').title"
        wait.until(lambda d: d.execute_script(lead) == str(files["copy"]))
        tiles = browser.find_elements(By.CSS_SELECTOR, "#dup-groups .tile")
        clicked = tiles[1].get_attribute("data-id")
        tiles[1].send_keys("\n")  # the keyboard works as a click does
        wait.until(seen.text_to_be_present_in_element((By.ID, "query-title"), f"(#{clicked})"))
        browser.find_element(By.CSS_SELECTOR, "nav button[data-view=clusters]").click()
        # Opened, the view clusters at the count `retrieve cluster` picks without -n.
        with Index.open(tmp_path / "idx") as ix:
            picked = default_cluster_count(ix.count)
        said = f"in {picked} clusters"
        wait.until(seen.text_to_be_present_in_element((By.ID, "cluster-status"), said))
        assert browser.find_element(By.ID, "cluster-k").get_attribute("value") == str(picked)
        browser.find_element(By.ID, "cluster-k").clear()
        browser.find_element(By.ID, "cluster-k").send_keys("3\n")
        wait.until(seen.text_to_be_present_in_element((By.ID, "cluster-status"), "in 3 clusters"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#cluster-rows .group")
        assert len(rows) == 4 and rows[-1].text.startswith("outliers")  # 3 clusters, outliers


def duplicates_screenshot(index_dir: Path, out: Path, profile: Path, size=(1280, 1000)) -> None:
    """The duplicates view (verified copies), as docs/serve-duplicates.png shows it (and a
    phone-sized copy beside ``out``, to look at)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(profile)
    # Thumbnails load lazily: only those in the window have to be there.
    thumbs_shown = (
        "return [...document.querySelectorAll('#dup-groups img')]"
        ".filter(i => i.getBoundingClientRect().top < innerHeight)"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    try:
        with serving(index_dir, timeout=180) as base:
            driver.set_window_size(*size)
            driver.get(base + "/")
            wait = WebDriverWait(driver, 600)  # the first answer signs every image: minutes
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#info-table tr"))
            driver.find_element(By.CSS_SELECTOR, "nav button[data-view=duplicates]").click()
            wait.until(seen.text_to_be_present_in_element((By.ID, "dup-status"), "verified)"))
            wait.until(lambda d: d.execute_script(thumbs_shown))
            driver.save_screenshot(str(out))
            driver.set_window_size(390, 844)
            wait.until(lambda d: d.execute_script(thumbs_shown))
            driver.save_screenshot(str(out.with_name(out.stem + "-phone.png")))
    finally:
        driver.quit()


if __name__ == "__main__":
    # python -m tests.test_serve_browser INDEX QUERY docs/serve.png
    # python -m tests.test_serve_browser duplicates INDEX docs/serve-duplicates.png
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        if sys.argv[1] == "duplicates":
            duplicates_screenshot(Path(sys.argv[2]), Path(sys.argv[3]), Path(profile))
        else:
            screenshot(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(profile))
