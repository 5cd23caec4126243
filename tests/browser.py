"""A page as a real browser shows it: Debian's headless Chromium, driven by selenium through chromedriver.

Both programs are the system's (apt-get install chromium chromium-driver): the driver's path is
passed explicitly, so selenium-manager never runs and nothing is downloaded. Without them a test
that opens a page is skipped, or fails where IMGCLS_REQUIRE_BROWSER=1 (CI) says a browser must exist.
"""

from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRE = "IMGCLS_REQUIRE_BROWSER"
WIDTH, HEIGHT = 1280, 900  # the window: a laptop screen
MAX_SCREENSHOT_HEIGHT = 16_000  # pixels; a page of 1,000 classes is cut there rather than kept whole
LOAD_TIMEOUT_S = 60
MAX_DIALOGS = 20  # a page that opens more is reported with the first ones

# Root in a container has no user namespace for Chromium's sandbox, and a small /dev/shm. The host
# rule makes every name unresolvable, so a page that fetches anything from a network logs an error.
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--force-device-scale-factor=1", f"--window-size={WIDTH},{HEIGHT}",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
]


@dataclass(frozen=True)
class Page:
    """What the browser saw: a sound page has no console errors and no broken images."""

    console_errors: list[str]  # the console's SEVERE entries (script errors, resources that failed to load), and dialogs
    broken_images: list[str]  # each <img> that did not decode: its alt text, or the start of its src
    section_ids: set[str]  # the id of each <section id=...>
    text: str  # the body's text as rendered


def browser_missing() -> str | None:
    """Why no page can be opened here, or None when it can."""
    absent = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if absent:
        return f"{' and '.join(absent)} not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def open_page(path: Path, screenshot: Path) -> Page:
    """Open a local HTML file from its file:// URL in a fresh headless Chromium, save a screenshot of
    the whole page (PNG) to `screenshot`, and report what the browser saw."""
    reason = browser_missing()
    if reason:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.unhandled_prompt_behavior = "ignore"  # a dialog is reported by _close_dialogs, not raised mid-command
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.set_page_load_timeout(LOAD_TIMEOUT_S)
            driver.get(Path(path).resolve().as_uri())  # returns after the load event: every inline image decoded
            dialogs = _close_dialogs(driver)
            broken = driver.execute_script(
                "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
                ".map(i => i.alt || i.src.slice(0, 80))"
            )
            sections = driver.execute_script("return [...document.querySelectorAll('section[id]')].map(s => s.id)")
            text = driver.execute_script("return document.body.innerText")
            _save_screenshot(driver, screenshot)
            errors = [f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            errors += dialogs
        finally:
            driver.quit()
    return Page(errors, broken, set(sections), text)


def _close_dialogs(driver) -> list[str]:
    """Each dialog a script opened (alert, confirm, prompt), closed: an open one blocks every later
    command. A page that runs a script it did not mean to (markup from a name) shows up here."""
    from selenium.common.exceptions import NoAlertPresentException

    seen = []
    for _ in range(MAX_DIALOGS):
        try:
            dialog = driver.switch_to.alert
            seen.append(f"dialog: {dialog.text}")
            dialog.accept()
        except NoAlertPresentException:
            break
    return seen


def _save_screenshot(driver, screenshot: Path) -> None:
    """The whole page, not only the window: DevTools' capture beyond the viewport."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], MAX_SCREENSHOT_HEIGHT), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
