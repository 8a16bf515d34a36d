"""A real browser (headless Chromium driven by Playwright) against the real service on a loopback port.

Skips with the reason when Playwright or a Chromium binary is missing. Playwright's own browser download is
not needed: any Chromium works (`STL_CHROMIUM=/path/to/chromium`, else `chromium` or `chromium-browser` on
PATH). On failure the page is saved as a screenshot whose path is printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from index.build import build
from service.app import create_app
from tests.browser.shop import Shop, write_shop
from tests.fixtures import serving
from tests.service.helpers import make_checkpoint, make_settings

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_MS = 15_000


def find_chromium() -> str | None:
    named = os.environ.get("STL_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def install_chromium() -> str | None:
    """Debian's chromium via apt-get where we may (root, apt, no STL_CHROMIUM), like the compose test installs
    docker: a fresh CI machine then runs the browser tests instead of skipping them. None if it cannot."""
    if os.environ.get("STL_CHROMIUM") or shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=900, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return find_chromium()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Shop, Path]]:
    """The shop's dataset and an artifact root built from it (product data, thumbnails)."""
    base = tmp_path_factory.mktemp("browser")
    found = write_shop(base / "data")
    root = base / "artifacts"
    # duplicate_threshold 0: only identical images are one group; the random tiny backbone puts every
    # product's vector close to every other's, and the vector rule would fold the whole catalogue into one.
    build(found.data, make_checkpoint(base / "head.pt"), root, device="cpu", workers=0, progress=False,
          duplicate_threshold=0.0)
    yield found, root


@pytest.fixture(scope="module")
def server_url(shop: tuple[Shop, Path]) -> Iterator[str]:
    with serving(create_app(make_settings(shop[1]))) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = find_chromium() or install_chromium()
    if executable is None:
        pytest.skip("no Chromium found: install one (apt-get install chromium) or set STL_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    setattr(item, f"report_{report.when}", report)  # the page fixture looks at it to screenshot failures
    return report


@pytest.fixture
def page(browser: Any, server_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1000, "height": 900}, locale="en-US")
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
              if message.type == "error" else None)
    opened.goto(server_url + "/")
    opened.problems = problems  # what the page's own JavaScript reported, for the tests to check
    try:
        yield opened
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            shot = Path(tempfile.mkdtemp(prefix="stl-browser-")) / f"{request.node.name}.png"
            opened.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot of the failed page: {shot}\nthe page reported: {problems}")
        context.close()
