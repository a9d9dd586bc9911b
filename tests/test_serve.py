"""The web service: TestClient for every endpoint and error, batching of concurrent requests."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from xray_images import pydicom_data_file

from xrayfm.models.bundle import ModelBundle
from xrayfm.serve.app import create_app


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> ModelBundle:
    return ModelBundle.load(bundle_dir)


@pytest.fixture(scope="module")
def client(bundle: ModelBundle) -> TestClient:
    return TestClient(create_app(bundle, max_upload_mb=10))


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    import pydicom

    a = pydicom.dcmread(pydicom_data_file("RG3_UNCR.dcm")).pixel_array.astype(np.float64)[::8, ::8]
    ok, buf = cv2.imencode(".png", (65535 * (a - a.min()) / np.ptp(a)).astype(np.uint16))
    assert ok
    return buf.tobytes()


def test_health_model_and_viewer(client: TestClient) -> None:
    assert client.get("/healthz").json()["heads"] == ["classify", "segment", "detect"]
    card = client.get("/v1/model").json()
    assert card["input_size"] == 64 and len(card["class_names"]) == 11
    page = client.get("/")
    assert (
        page.status_code == 200
        and 'id="findings"' in page.text
        and "http" not in page.text.split("<script>")[0]
    )
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_dicom_with_overlay(client: TestClient) -> None:
    path = pydicom_data_file("RG1_UNCR.dcm")
    r = client.post("/v1/predict?overlay=true", files={"file": ("RG1_UNCR.dcm", path.read_bytes())})
    assert r.status_code == 200, r.text
    doc = r.json()
    fr = doc["frames"][0]
    assert doc["num_frames"] == 1 and doc["modality"] == "CR" and len(fr["top3"]) == 3
    img = cv2.imdecode(np.frombuffer(base64.b64decode(fr["overlay_png_base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[:2] == (fr["height"], fr["width"])
    assert sum(fr["metal"]["mask_rle"]["counts"]) == fr["height"] * fr["width"]


def test_predict_png_and_multiframe(client: TestClient, png_bytes: bytes) -> None:
    r = client.post("/v1/predict", files={"file": ("ankle.png", png_bytes, "image/png")})
    assert r.status_code == 200, r.text
    fr = r.json()["frames"][0]
    assert "overlay_png_base64" not in fr and fr["pixel_spacing_mm"] is None
    r = client.post(
        "/v1/predict", files={"file": ("mr.dcm", pydicom_data_file("emri_small.dcm").read_bytes())}
    )
    doc = r.json()
    assert r.status_code == 200 and len(doc["frames"]) == 10 and doc["aggregate"]["frames"] == 10


def test_bad_uploads_get_clear_4xx(client: TestClient) -> None:
    r = client.post("/v1/predict", files={"file": ("notes.txt", b"hello, not an image")})
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"] and "DICOM" in r.json()["detail"]
    truncated = pydicom_data_file("RG1_UNCR.dcm").read_bytes()[:4000]
    r = client.post("/v1/predict", files={"file": ("cut.dcm", truncated)})
    assert 400 <= r.status_code < 500 and "cut.dcm" in r.json()["detail"] and "/tmp" not in r.json()["detail"]
    r = client.post("/v1/predict", files={"file": ("empty.png", b"")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = client.post("/v1/predict", files={"file": ("big.dcm", b"\0" * (12 * 2**20))})
    assert r.status_code == 413 and "limit of 10 MB" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200  # the service is unaffected


def test_token_required_when_set(bundle: ModelBundle, png_bytes: bytes) -> None:
    c = TestClient(create_app(bundle, token="s3cret"))
    assert c.get("/healthz").status_code == 200
    r = c.get("/v1/model")
    assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    assert c.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.post(
        "/v1/predict", files={"file": ("a.png", png_bytes)}, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status_code == 200


def test_concurrent_requests_are_batched(bundle: ModelBundle, png_bytes: bytes) -> None:
    app = create_app(bundle, batch_window_ms=500, max_batch=8)
    calls: list[int] = []
    hook = bundle.backbone.model.patch_embed.register_forward_hook(
        lambda m, i, o: calls.append(i[0].shape[0])
    )

    async def fire() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(
                *(c.post("/v1/predict", files={"file": (f"{i}.png", png_bytes)}) for i in range(6))
            )

    try:
        responses = asyncio.run(fire())
    finally:
        hook.remove()
    assert all(r.status_code == 200 for r in responses)
    tops = {r.json()["frames"][0]["top3"][0]["region"] for r in responses}
    assert len(tops) == 1  # same image, same answer whichever batch it rode in
    assert sum(calls) == 6 and len(calls) < 6  # fewer backbone passes than requests
    assert app.state.batcher.batches == len(calls)


def test_serve_cli_starts_answers_and_stops(bundle: ModelBundle, tmp_path: Path) -> None:
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-c",
        "from xrayfm.cli import main; main()",
        "serve",
        "--model",
        str(bundle.path),
        "--port",
        str(port),
        "--token",
        "t",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.time() + 60, None
        while time.time() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None and health["arch"] == "vit_tiny_patch16"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/model").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert "serving vit_tiny_patch16" in out and "served 0 frame(s) in 0 batch(es)" in out


def test_50_concurrent_requests_with_bad_uploads_mixed_in(bundle: ModelBundle, png_bytes: bytes) -> None:
    """50 threads POST at once to a real uvicorn server; malformed uploads fail alone with a 4xx."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_server import uvicorn_in_thread

    from xrayfm.serve.results import rle_decode

    ct = pydicom_data_file("CT_small.dcm").read_bytes()  # 128 x 128 CT DICOM
    png_shape = cv2.imdecode(np.frombuffer(png_bytes, np.uint8), cv2.IMREAD_UNCHANGED).shape
    bad = {
        "garbage.dcm": (np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(), 415),
        "truncated.dcm": (ct[: len(ct) // 2], 400),
        "empty.dcm": (b"", 400),
        "notes.txt": (b"patient notes, not an image\n" * 20, 415),
    }
    names = [*bad, "garbage.dcm"]  # 5 bad uploads spread through the 50 (one kind twice)
    uploads = [
        (names[i // 10], bad[names[i // 10]][0])
        if i % 10 == 3
        else ((f"good_{i}.png", png_bytes) if i % 2 else (f"good_{i}.dcm", ct))
        for i in range(50)
    ]

    with uvicorn_in_thread(create_app(bundle, batch_window_ms=10, max_batch=8)) as base:

        def post(item: tuple[str, bytes]) -> tuple[str, httpx.Response]:
            name, data = item
            return name, httpx.post(f"{base}/v1/predict", files={"file": (name, data)}, timeout=120)

        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(post, uploads))
        health = httpx.get(f"{base}/healthz", timeout=10)

    assert health.status_code == 200 and health.json()["status"] == "ok"
    seen_bad = set()
    for name, r in answers:
        if name in bad:
            seen_bad.add(name)
            assert r.status_code == bad[name][1], (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert isinstance(detail, str) and len(detail) > 10 and "/tmp" not in detail, detail
            continue
        assert r.status_code == 200, (name, r.text)
        doc = r.json()
        assert doc["filename"] == name and doc["num_frames"] == 1
        fr = doc["frames"][0]
        shape = (128, 128) if name.endswith(".dcm") else png_shape
        assert (fr["height"], fr["width"]) == shape
        assert len(fr["top3"]) == 3 and all(0 <= t["probability"] <= 1 for t in fr["top3"])
        assert rle_decode(fr["metal"]["mask_rle"]).shape == shape
        assert isinstance(fr["screws"], list)
    assert seen_bad == set(bad) and sum(n in bad for n, _ in answers) == 5
