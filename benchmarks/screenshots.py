"""Screenshots for the docs: the viewer of ``xrayfm serve`` after an upload, and the top of a report.

    .venv/bin/python benchmarks/screenshots.py --model /tmp/dd/bundle \\
        --dicom /tmp/dd/samples/patient_0000_series_02_img_002.dcm --report /tmp/dd/report.html

Starts ``xrayfm serve --model MODEL`` as a process on a free localhost port, opens the viewer in
headless Debian chromium through Playwright (``executable_path=/usr/bin/chromium``; never
``playwright install``), uploads the DICOM, waits for the overlay and the findings table and
saves ``docs/images/viewer.png``; then opens the report HTML (``file://``) and saves the top of
the page as ``docs/images/report.png``. ``--report`` is optional. The overlay is shown zoomed to
``--overlay-px`` (512) wide for legibility; nothing else about the page is changed.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, port: int) -> subprocess.Popen[str]:
    """``xrayfm serve`` as a process; returns once ``/healthz`` answers."""
    cmd = [sys.executable, "-c", "from xrayfm.cli import main; main()", "serve", "--model", str(model)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"xrayfm serve exited with {proc.returncode}:\n{proc.stdout.read()}")  # type: ignore[union-attr]
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("xrayfm serve did not answer /healthz within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/dd/bundle"), help="model bundle")
    ap.add_argument("--dicom", type=Path, required=True, help="file to upload in the viewer")
    ap.add_argument("--report", type=Path, help="report HTML to screenshot (top of the page)")
    ap.add_argument("--out", type=Path, default=IMAGES, help="folder for viewer.png / report.png")
    ap.add_argument(
        "--overlay-px", type=int, default=512, help="display width of the overlay (small images are zoomed)"
    )
    args = ap.parse_args()
    if not Path(CHROMIUM).is_file():
        raise SystemExit("no chromium binary: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_server(args.model, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(f"http://127.0.0.1:{port}/")
            # display zoom only (the viewer shows small images at their natural size)
            page.add_style_tag(
                content=f"#overlay {{ width: {args.overlay_px}px; image-rendering: pixelated; }}"
            )
            page.wait_for_function("document.getElementById('model').textContent.includes('heads')")
            page.set_input_files("#file", str(args.dicom))
            page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=120_000)
            page.wait_for_function("document.querySelectorAll('#findings tr').length > 3")
            page.wait_for_function("document.getElementById('status').textContent.includes('done')")
            rows = page.locator("#findings tr").all_inner_texts()
            page.screenshot(path=str(args.out / "viewer.png"), full_page=True)
            print("viewer.png:", " | ".join(r.replace("\t", " ") for r in rows))
            if args.report:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(args.report.resolve().as_uri())
                page.wait_for_load_state("load")
                page.screenshot(path=str(args.out / "report.png"))
                print("report.png: top 1200x900 of", args.report)
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        print(out.strip().splitlines()[-1] if out.strip() else "")


if __name__ == "__main__":
    main()
