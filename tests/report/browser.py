"""Headless Chromium for the review page's tests, through the system's chromedriver (Selenium).

The tests skip, with the reason, when Chromium, its driver or Selenium is missing. Train ids
are strings on the page (int64 ids beyond 2^53 would not survive a JavaScript number), so the
helpers return them as strings.
"""

import os
import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium
except ImportError:
    selenium = None
BROWSER_MISSING = ("chromium is not installed (apt-get install chromium)" if CHROMIUM is None
                   else "chromedriver is not installed (apt-get install chromium-driver)" if CHROMEDRIVER is None
                   else "selenium is not installed (pip install selenium, in the test extra)" if selenium is None
                   else None)
needs_browser = pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")
#: The columns of the page's decisions.csv, train_key included (a source with keys).
COLUMNS = ["train_id", "label", "action", "new_label", "train_key", "decided_at"]
#: An int64 id beyond 2^53: as a JavaScript (or JSON) number it would become 2^62.
BIG = 2**62 + 1


def start_browser(tmp_path_factory):
    """Headless Chromium through the system's chromedriver; downloads go to a folder of the test.

    Both paths are given, so that Selenium Manager has nothing to look up or download.
    """
    if BROWSER_MISSING:
        pytest.skip(BROWSER_MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1300,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver, downloads
    driver.quit()




def open_page(driver, page: str) -> None:
    """Opens the page with no decision stored from an earlier test."""
    driver.get("file://" + page)
    driver.execute_script("localStorage.clear()")
    driver.refresh()


def shown(driver) -> list:
    """(train id (a string), given label, model's class, classes) of the suspects on the gallery's page."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#rv-items .suspect')).map(e => "
        "[e.dataset.trainId, Number(e.dataset.label), Number(e.dataset.pred), e.className])")


def progress(driver) -> str:
    return driver.find_element("id", "rv-progress").text.split(" (")[0]


def current(driver) -> str:
    return driver.find_element("css selector", ".suspect.current").get_attribute("data-train-id")


def press(driver, *keys) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def decide(driver, key: str) -> str:
    """Presses a decision key on the current suspect; returns its id."""
    tid = current(driver)
    press(driver, key)
    return tid


def wait_for(path: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.isfile(path) and time.monotonic() < end:
        time.sleep(0.05)
    assert os.path.isfile(path), f"{path} was not downloaded"




def loaded_images(driver, node, timeout: float = 10.0) -> list:
    """(src, natural width) of the images in ``node`` once each has loaded or failed; the node
    is scrolled into view first, because the thumbnails are lazy."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", node)
    script = ("return Array.from(arguments[0].querySelectorAll('img'))"
              ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
    end = time.monotonic() + timeout
    while not all(done for _s, done, _w in driver.execute_script(script, node)) and time.monotonic() < end:
        time.sleep(0.05)
    return [(src, width) for src, _done, width in driver.execute_script(script, node)]


def export(driver, downloads, to) -> str:
    """Clicks the page's export button and moves the downloaded ``decisions.csv`` to ``to``
    (so that the next export of the module's browser cannot be confused with it)."""
    path = os.path.join(downloads, "decisions.csv")
    driver.find_element("id", "rv-export").click()
    wait_for(path)
    shutil.move(path, str(to))
    return str(to)


def csv_rows(path) -> list:
    """The rows of a CSV file, header first."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))
