"""report.html in a real browser: Debian's headless Chromium, driven by Playwright.

The page must open from a file with nothing fetched, log no console error, and show its
tables and figures (each image decoded, with a size); the screenshot is kept in the test's
folder and checked to hold more than a blank page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from steps.report import build as report
from tests.test_report import ROWS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)")
# Flags for a root user on a machine with a closed network (see the Makefile's browser target).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def open_page(html: Path, shot: Path) -> dict:
    from playwright.sync_api import sync_playwright

    seen = {"console_errors": [], "page_errors": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: m.type == "error" and seen["console_errors"].append(m.text))
        page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.goto(html.as_uri(), wait_until="load")
        seen["tables"] = page.locator("table").count()
        seen["rows"] = page.locator("table tbody tr").count()
        seen["headings"] = page.locator("h2").all_inner_texts()
        seen["images"] = page.evaluate(
            "() => [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, "
            "shown: i.getBoundingClientRect().width}))")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    return seen


def test_report_html_opens_offline_and_shows_tables_and_figures(tmp_path):
    paths = report.write(pd.DataFrame(ROWS), tmp_path / "report", {"matrix": "fixture", "run_id": "r1"})
    shutil.rmtree(tmp_path / "report" / "plots")  # self-contained: the page must not need them
    shot = tmp_path / "report.png"
    seen = open_page(paths["html"], shot)

    assert seen["console_errors"] == [] and seen["page_errors"] == []
    assert [u for u in seen["requests"] if not u.startswith(("file:", "data:"))] == []
    assert len(seen["images"]) == 5 and all(i["ok"] and i["w"] > 300 and i["shown"] > 300 for i in seen["images"])
    assert seen["tables"] >= 10
    assert seen["rows"] >= len(ROWS)  # the main table alone has a row per cell
    assert "Key findings" in seen["headings"] and "Cells that did not finish" in seen["headings"]

    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] > 3000 and pixels.shape[1] == 1400  # a long page, full width
    ink = (pixels[..., :3].mean(axis=2) < 0.9).mean()
    assert ink > 0.03, f"the screenshot is almost blank ({ink:.1%} non-white)"
