"""The viewer page in a real browser: upload a real DICOM, wait for the overlay and the findings.

Needs Debian's chromium (`apt-get install chromium`) and Playwright for Python (`pip install
playwright`; no `playwright install`: the system browser is used).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serve_server import uvicorn_in_thread

from xrayfm.models.bundle import ModelBundle
from xrayfm.serve.app import create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_viewer_shows_overlay_and_findings(request: pytest.FixtureRequest) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip("no chromium binary (apt-get install chromium) for the browser test")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright for the browser test"
    )
    pytest.importorskip("uvicorn")
    data = pytest.importorskip("pydicom.data", reason="pydicom-data is needed for a real DICOM")
    dicom = data.get_testdata_file("RG3_UNCR.dcm")

    bundle = ModelBundle.load(request.getfixturevalue("bundle_dir"))  # after the skips: no build when skipped
    with uvicorn_in_thread(create_app(bundle, token="tok")) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(f"{base}/")
        page.wait_for_function("document.getElementById('model').textContent.includes('vit_tiny')")
        page.fill("#token", "tok")
        page.set_input_files("#file", dicom)
        page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=60_000)
        size = page.evaluate(
            "[document.getElementById('overlay').naturalWidth,"
            " document.getElementById('overlay').naturalHeight]"
        )
        rows = page.locator("#findings tr").all_inner_texts()
        status = page.inner_text("#status")
        page.fill("#token", "wrong")
        page.set_input_files("#file", dicom)
        page.wait_for_function("document.getElementById('status').className === 'error'", timeout=60_000)
        refused = page.inner_text("#status")
        browser.close()
    import pydicom

    ds = pydicom.dcmread(dicom, stop_before_pixels=True)
    h, w = int(ds.Rows), int(ds.Columns)
    assert size == [w, h]  # overlay at the original image size
    assert sum(r.startswith("region") for r in rows) == 3
    assert any(r.startswith("metal area") for r in rows) and any(r.startswith("screws") for r in rows)
    assert "1 frame(s) done" in status
    assert refused.startswith("401") and "bearer token" in refused
