"""The web service: FastAPI app over a model bundle, with request batching and the viewer page.

Endpoints: ``GET /`` (viewer), ``GET /healthz``, ``GET /v1/model`` (model card),
``POST /v1/predict`` (multipart ``file``: DICOM or PNG/JPEG/TIFF; ``?overlay=true`` adds a
base64 PNG overlay per frame), OpenAPI docs at ``/docs``. With a token, ``/v1/*`` needs
``Authorization: Bearer <token>``.

Batching: each decoded frame is queued; one worker takes the first waiting frame, gathers more
for up to ``batch_window_ms`` (or until ``max_batch``) and runs them through the bundle in a
worker thread as ONE backbone pass serving all heads. Decoding happens per request before the
queue, so a bad upload fails alone and never touches a batch.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from xrayfm.io import DecodedFrame, DecodeError, FrameSampling, read_any
from xrayfm.models.bundle import ModelBundle
from xrayfm.report.overlay import draw_overlay, png_bytes
from xrayfm.serve.results import aggregate, frame_spacing, result_json

# Decode failures that mean "this is not a format we read" rather than "this file is damaged".
_UNSUPPORTED = {
    "unsupported_format",
    "not_dicom",
    "unsupported_photometric",
    "unsupported_transfer_syntax",
    "unsupported_pixel_data",
}


@dataclass
class _Job:
    image: np.ndarray
    spacing: tuple[float, float] | None
    future: asyncio.Future[dict[str, Any]]


class Batcher:
    """Gathers concurrently queued frames into batches for :meth:`ModelBundle.predict`."""

    def __init__(self, bundle: ModelBundle, window_ms: float = 10.0, max_batch: int = 8) -> None:
        self.bundle = bundle
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self.batches = 0
        self.images = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, image: np.ndarray, spacing: tuple[float, float] | None) -> dict[str, Any]:
        """Queue one frame; resolves to its prediction."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        assert self._queue is not None
        await self._queue.put(_Job(image, spacing, fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = loop.time() + self.window
            while len(jobs) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(
                    self.bundle.predict, [j.image for j in jobs], [j.spacing for j in jobs]
                )
            except Exception as exc:  # noqa: BLE001 - the failure belongs to the waiting requests
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(jobs)
            for j, r in zip(jobs, results):
                if not j.future.done():
                    j.future.set_result(r)


def _safe_name(name: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(name or "upload").name)[:100] or "upload"


def _decode_upload(data: bytes, filename: str, max_frames: int) -> list[DecodedFrame]:
    """Decode uploaded bytes via the io layer; errors name the upload, not the temporary file."""
    with tempfile.TemporaryDirectory(prefix="xrayfm-upload-") as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        try:
            return list(read_any(path, FrameSampling(max_frames=max_frames)))
        except DecodeError as exc:
            exc.args = (str(exc).replace(str(path), filename),)
            raise


def viewer_html() -> str:
    """The viewer page (package data)."""
    return resources.files("xrayfm.serve").joinpath("static/viewer.html").read_text()


def create_app(
    bundle: ModelBundle,
    token: str | None = None,
    max_upload_mb: float = 50.0,
    batch_window_ms: float = 10.0,
    max_batch: int = 8,
    max_frames: int = 16,
) -> FastAPI:
    """The FastAPI app serving ``bundle``."""
    limit = int(max_upload_mb * 1024 * 1024)
    batcher = Batcher(bundle, batch_window_ms, max_batch)
    app = FastAPI(title="xrayfm", version="1", description="X-ray body region, metal mask and screws.")
    app.state.batcher = batcher

    def too_large(size: int) -> HTTPException:
        return HTTPException(
            413,
            f"upload of {size / 2**20:.1f} MB exceeds the limit of {max_upload_mb:g} MB; "
            "send a smaller file or start the server with a larger --max-upload-mb",
        )

    @app.middleware("http")
    async def upload_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if (
            request.url.path == "/v1/predict"
            and length
            and length.isdigit()
            and int(length) > limit + 64 * 1024
        ):
            return JSONResponse({"detail": too_large(int(length)).detail}, status_code=413)
        return await call_next(request)

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), token.encode())):
            raise HTTPException(
                401,
                "missing or wrong bearer token; send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def viewer() -> str:
        return viewer_html()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "arch": bundle.card()["arch"], "heads": list(bundle.heads)}

    @app.get("/v1/model", dependencies=[Depends(check_token)])
    async def model() -> dict[str, Any]:
        return bundle.card()

    @app.post("/v1/predict", dependencies=[Depends(check_token)])
    async def predict(
        file: Annotated[UploadFile, File(description="DICOM, PNG, JPEG or TIFF")],
        overlay: Annotated[bool, Query(description="add a base64 PNG overlay per frame")] = False,
    ) -> dict[str, Any]:
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise too_large(len(data))
        if not data:
            raise HTTPException(400, "the uploaded file is empty; send a DICOM, PNG, JPEG or TIFF file")
        name = _safe_name(file.filename)
        try:
            frames = await asyncio.to_thread(_decode_upload, data, name, max_frames)
        except DecodeError as exc:
            raise HTTPException(415 if exc.reason in _UNSUPPORTED else 400, str(exc)) from exc
        if not frames:
            raise HTTPException(400, f"{name}: no frames to predict on")
        results = await asyncio.gather(*(batcher.submit(f.image, frame_spacing(f)) for f in frames))
        records = []
        for f, r in zip(frames, results):
            rec = result_json(r, f)
            if overlay:
                rec["overlay_png_base64"] = base64.b64encode(png_bytes(draw_overlay(f.image, r))).decode()
            records.append(rec)
        doc: dict[str, Any] = {
            "filename": name,
            "num_frames": frames[0].num_frames,
            "modality": frames[0].meta.get("modality"),
            "frames": records,
        }
        if len(records) > 1:
            doc["aggregate"] = aggregate(records)
        return doc

    return app
