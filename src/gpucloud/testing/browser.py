"""A real headless Chromium for the console's browser tests: Debian's ``chromium`` and
``chromium-driver`` packages (hack/install-system-deps.sh), driven by Selenium. Nothing
is downloaded: the driver and the browser are given by path and Selenium Manager is
kept offline."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("GPUCLOUD_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("GPUCLOUD_CHROMEDRIVER", "/usr/bin/chromedriver"))


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"{path} is not installed (Debian: apt-get install chromium chromium-driver)"
    return None


@contextmanager
def chromium(downloads: Path, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A WebDriver for a fresh headless Chromium profile; files it downloads land in
    ``downloads``."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch drivers or browsers
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-extensions", "--no-first-run", f"--window-size={width},{height}",
    ):  # fmt: skip
        opts.add_argument(arg)
    downloads.mkdir(parents=True, exist_ok=True)
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, predicate: Callable[[Any], Any], what: str, timeout: float = 20) -> Any:
    """Selenium's explicit wait, failing with ``what`` and the page's URL."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(predicate)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what} on "
                             f"{driver.current_url}") from None  # fmt: skip


def downloaded(folder: Path, suffix: str, timeout: float = 20) -> Path:
    """The one finished download ending in ``suffix`` (Chromium writes .crdownload first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if p.name.endswith(suffix)]
        if done and not any(p.name.endswith(".crdownload") for p in folder.iterdir()):
            return done[0]
        time.sleep(0.05)
    raise AssertionError(f"no {suffix} download in {folder} after {timeout} s")


class Screens:
    """Numbered screenshots in one folder (a test artifact)."""

    def __init__(self, driver: Any, folder: Path) -> None:
        self.driver, self.folder, self.n = driver, folder, 0
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    def shot(self, name: str) -> Path:
        """The whole page, not only what the window shows (Chromium's DevTools)."""
        self.n += 1
        path = self.folder / f"{self.n:02d}-{name}.png"
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
        )
        path.write_bytes(base64.b64decode(png["data"]))
        return path
