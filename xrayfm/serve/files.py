"""Prediction over files and folders, writing JSON + PNG per file: the API behind ``xrayfm predict``.

Frames stream from the decoder into batches of ``batch_size`` that may span files (a folder of
single-frame images is batched too); a file's JSON is written as soon as its last frame is
predicted, so memory holds one batch of images, not whole multi-frame files. A file that fails to
decode (at open or at any frame) is reported through ``on_error`` and writes no JSON; frames of it
already queued are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xrayfm.config import atomic_write_bytes, atomic_write_text
from xrayfm.io import DecodedFrame, DecodeError, FrameSampling, read_any
from xrayfm.report.overlay import draw_overlay, png_bytes
from xrayfm.serve.results import aggregate, frame_spacing, result_json


def list_inputs(inputs: Sequence[Path]) -> list[tuple[Path, str]]:
    """(file, output name) for every input; folders are walked recursively in sorted order.

    A file given directly is named by its stem; a file found in a folder by its path relative to
    that folder with ``/`` replaced by ``__``; repeated names get ``_1``, ``_2``...
    """
    files: list[tuple[Path, str]] = []
    for p in inputs:
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
                files.append((f, "__".join(f.relative_to(p).with_suffix("").parts)))
        elif p.is_file():
            files.append((p, p.with_suffix("").name))
        else:
            raise FileNotFoundError(f"input {p} does not exist; pass DICOM/PNG/JPEG/TIFF files or folders")
    seen: dict[str, int] = {}
    named = []
    for f, name in files:
        n = seen.get(name, 0)
        seen[name] = n + 1
        named.append((f, name if n == 0 else f"{name}_{n}"))
    return named


@dataclass
class _FileState:
    path: Path
    name: str
    queued: int = 0
    decoded_all: bool = False
    failed: bool = False
    written: bool = False
    num_frames: int = 0
    modality: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FilePredictor:
    """Streams frames of many files through ``bundle.predict`` in batches; writes outputs to ``out``."""

    bundle: Any
    out: Path
    batch_size: int = 8
    sampling: FrameSampling = field(default_factory=FrameSampling)
    overlay: bool = True
    dicom_seg: bool = False
    dicom_sr: bool = False
    on_error: Callable[[DecodeError], None] = lambda exc: None
    on_note: Callable[[str], None] = lambda msg: None
    on_file: Callable[[], None] = lambda: None
    frames_done: int = 0
    files_failed: int = 0
    _pending: list[tuple[_FileState, DecodedFrame]] = field(default_factory=list)

    def run(self, files: Sequence[tuple[Path, str]]) -> None:
        """Predict every file; ``on_file`` is called once per file (done or failed)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for path, name in files:
            state = _FileState(path, name)
            try:
                for frame in read_any(path, self.sampling):
                    state.num_frames, state.modality = frame.num_frames, frame.meta.get("modality")
                    self._pending.append((state, frame))
                    state.queued += 1
                    if len(self._pending) >= self.batch_size:
                        self._flush()
            except DecodeError as exc:
                state.failed = True
                self.files_failed += 1
                self.on_error(exc)
                self.on_file()
            state.decoded_all = True
            self._maybe_finish(state)
        self._flush()

    def _flush(self) -> None:
        batch = [(s, f) for s, f in self._pending if not s.failed]
        self._pending = []
        if not batch:
            return
        results = self.bundle.predict([f.image for _, f in batch], [frame_spacing(f) for _, f in batch])
        for (state, frame), res in zip(batch, results):
            state.records.append(self._write_frame(state, frame, res))
            self.frames_done += 1
        for state in {id(s): s for s, _ in batch}.values():
            self._maybe_finish(state)

    def _write_frame(self, state: _FileState, frame: DecodedFrame, res: dict[str, Any]) -> dict[str, Any]:
        name = state.name
        tag = name if frame.num_frames == 1 else f"{name}_f{frame.frame_index:04d}"
        mask_png = None
        if "metal_mask" in res:
            mask_png = f"{tag}_mask.png"
            atomic_write_bytes(self.out / mask_png, png_bytes(res["metal_mask"].astype("uint8") * 255))
        rec = result_json(res, frame, mask_png)
        if self.overlay:
            rec["overlay_png"] = f"{tag}_overlay.png"
            atomic_write_bytes(self.out / rec["overlay_png"], png_bytes(draw_overlay(frame.image, res)))
        if self.dicom_seg and "metal_mask" in res and frame.meta.get("transfer_syntax_uid"):
            if frame.num_frames == 1:
                rec["dicom_seg"] = self._write_seg(state.path, f"{tag}_seg.dcm", res["metal_mask"])
            elif not state.records:  # say it once per file
                self.on_note(f"no DICOM SEG for {state.path.name}: multi-frame sources are not supported")
        if self.dicom_sr and frame.meta.get("transfer_syntax_uid"):
            seg = self.out / rec["dicom_seg"] if rec.get("dicom_seg") else None
            rec["dicom_sr"] = self._write_sr(state.path, f"{tag}_sr.dcm", res, seg, frame.frame_index)
        return rec

    def _write_seg(self, source: Path, filename: str, mask: Any) -> str | None:
        from xrayfm.serve.dicom_seg import metal_segmentation_bytes

        arch = str(self.bundle.card()["arch"])
        return self._write_dicom(
            "SEG", source, filename, lambda: metal_segmentation_bytes(source, mask, arch, _version())
        )

    def _write_sr(
        self, source: Path, filename: str, res: dict[str, Any], seg: Path | None, index: int
    ) -> str | None:
        from xrayfm.serve.dicom_sr import findings_sr_bytes

        arch = str(self.bundle.card()["arch"])
        return self._write_dicom(
            "SR", source, filename, lambda: findings_sr_bytes(source, res, arch, _version(), seg, index)
        )

    def _write_dicom(self, kind: str, source: Path, filename: str, encode: Callable[[], bytes]) -> str | None:
        """Write ``encode()`` to ``filename``; a source it refuses gives one note and ``None``."""
        try:
            blob = encode()
        except ValueError as exc:
            self.on_note(f"no DICOM {kind} for {source.name}: {exc}")
            return None
        atomic_write_bytes(self.out / filename, blob)
        return filename

    def _maybe_finish(self, state: _FileState) -> None:
        if state.failed or state.written or not state.decoded_all or len(state.records) < state.queued:
            return
        doc: dict[str, Any] = {
            "source": state.path.name,
            "num_frames": state.num_frames,
            "modality": state.modality,
            "frames": state.records,
        }
        if len(state.records) > 1:
            doc["aggregate"] = aggregate(state.records)
        atomic_write_text(self.out / f"{state.name}.json", json.dumps(doc))
        state.written = True
        self.on_file()


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("xrayfm")
    except metadata.PackageNotFoundError:
        return "unknown"
