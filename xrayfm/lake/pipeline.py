"""One source file -> lake rows or a quarantine record (runs inside ingest worker processes).

DICOM: read -> ``Anonymizer.quarantine_reason`` -> ``Anonymizer.anonymize`` -> frames decoded
from the anonymized copy -> resize -> encode. Only whitelisted technical attributes of the
anonymized copy are kept. PNG/JPEG/TIFF: ids are keyed pseudonyms of the decoded pixels' hash,
one patient per file. Paths can carry PHI, so quarantine records hold a keyed hash of the
relative path and messages have the path scrubbed.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from xrayfm.conventions import to_uint16
from xrayfm.io import DecodedFrame, DecodeError, FrameSampling, is_dicom, read_dicom_frames, read_image_file
from xrayfm.lake.codec import encode_image, image_sha, resize_max_side
from xrayfm.lake.schema import DEVICE_DICOM, INGEST_VERSION, KEPT_DICOM
from xrayfm.privacy import Anonymizer, PseudoIds

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})


@dataclass
class FileJob:
    """One file to ingest: absolute path and path relative to its source root (posix)."""

    path: str
    rel: str


@dataclass
class FileResult:
    """What one file produced; exactly one of rows / quarantine / skipped is meaningful."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    quarantine: dict[str, Any] | None = None
    detail: str | None = None  # unscrubbed message for the operator's local report only
    skipped: bool = False


@dataclass
class RowContext:
    """Settings shared by every file of an ingest run."""

    max_side: int
    codec: str
    sampling: FrameSampling
    apply_voi: bool
    retain_device_identity: bool
    source: str
    split_fractions: tuple[float, float, float]
    ingested_at: datetime


def split_for(patient_id: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic train/val/test split from the (already keyed) patient pseudonym."""
    u = int(hashlib.sha256(f"split|{patient_id}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _value(ds: pydicom.Dataset, keyword: str, typ: str) -> Any:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        if typ == "string":
            s = str(v[0] if isinstance(v, pydicom.multival.MultiValue) else v).strip()
            return s or None
        vals = [float(x) for x in (v if isinstance(v, pydicom.multival.MultiValue) else [v])]
        if not vals:
            return None
        return int(vals[0]) if typ.startswith("int") else float(np.mean(vals))
    except (TypeError, ValueError):
        return None


def dicom_meta(ds: pydicom.Dataset, retain_device_identity: bool) -> dict[str, Any]:
    """Whitelisted technical attributes of an (anonymized) dataset, typed for the lake schema."""
    kept = KEPT_DICOM + (DEVICE_DICOM if retain_device_identity else ())
    out = {col: _value(ds, kw, str(typ)) for col, kw, typ in kept}
    if out["laterality"] is None:
        out["laterality"] = _value(ds, "Laterality", "string")
    for col, _, _ in DEVICE_DICOM:
        out.setdefault(col, None)
    return out


def _spacing(ds: pydicom.Dataset | None) -> tuple[float, float] | None:
    if ds is None:
        return None
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw)
        try:
            if v is not None and len(v) == 2 and float(v[0]) > 0 and float(v[1]) > 0:
                return float(v[0]), float(v[1])
        except (TypeError, ValueError):
            continue
    return None


def frame_row(frame: DecodedFrame, ids: PseudoIds, meta: dict[str, Any], spacing: tuple[float, float] | None,
              ctx: RowContext, kind: str) -> dict[str, Any]:
    """Resize (unless the reader already did) and encode one frame; return its lake row."""
    oh, ow = frame.source_shape
    img16 = to_uint16(resize_max_side(frame.image, ctx.max_side))
    h, w = img16.shape
    row: dict[str, Any] = {
        "image_id": f"{ids.instance}-{frame.frame_index}",
        "patient_id": ids.patient,
        "study_id": ids.study,
        "series_id": ids.series,
        "instance_id": ids.instance,
        "frame_index": frame.frame_index,
        "num_frames": frame.num_frames,
        "split": split_for(ids.patient, ctx.split_fractions),
        "source": ctx.source,
        "source_kind": kind,
        "source_pixel_hash": frame.raw_hash,
        "image": encode_image(img16, ctx.codec),
        "image_codec": ctx.codec,
        "image_sha": image_sha(img16),
        "height": h,
        "width": w,
        "orig_height": oh,
        "orig_width": ow,
        "pixel_spacing_mm": None if spacing is None else (spacing[0] * oh / h + spacing[1] * ow / w) / 2,
        "orig_pixel_spacing_mm": None if spacing is None else (spacing[0] + spacing[1]) / 2,
        "ingest_version": INGEST_VERSION,
        "ingested_at": ctx.ingested_at,
    }
    row.update(meta)
    return row


def _scrub(message: str, job: FileJob) -> str:
    for s in sorted({job.path, str(Path(job.path).resolve()), job.rel, posixpath.basename(job.rel)}, key=len,
                    reverse=True):
        if s:
            message = message.replace(s, "<file>")
    return " ".join(message.split())[:300]


def _quarantine(anon: Anonymizer, job: FileJob, ctx: RowContext, reason: str, message: str) -> FileResult:
    record = {
        "path_key": anon.pseudonym(job.rel, "path"),
        "ext": Path(job.rel).suffix.lower()[:16],
        "source": ctx.source,
        "reason": reason,
        "message": _scrub(message, job),
        "ingest_version": INGEST_VERSION,
        "ingested_at": ctx.ingested_at,
    }
    return FileResult(quarantine=record, detail=message)


def _image_ids(anon: Anonymizer, raw_hash: str) -> PseudoIds:
    return PseudoIds(*(anon.pseudonym(raw_hash, f"file-{k}") for k in ("patient", "study", "series", "instance")))


def process_file(job: FileJob, anon: Anonymizer, ctx: RowContext, known: set[str] | frozenset[str]) -> FileResult:
    """Turn one file into rows (frames whose source hash is in ``known`` are only counted)."""
    try:
        return _process(job, anon, ctx, known)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the run
        return _quarantine(anon, job, ctx, "unexpected_error", f"{type(exc).__name__}: {exc}")


def _process(job: FileJob, anon: Anonymizer, ctx: RowContext, known: set[str] | frozenset[str]) -> FileResult:
    result = FileResult()
    if Path(job.path).suffix.lower() in IMAGE_EXTS:
        try:
            frame = read_image_file(job.path)
        except DecodeError as exc:
            return _quarantine(anon, job, ctx, exc.reason, str(exc))
        if frame.raw_hash in known:
            result.duplicates = 1
        else:
            meta = dict.fromkeys(c for c, _, _ in KEPT_DICOM + DEVICE_DICOM)
            result.rows.append(frame_row(frame, _image_ids(anon, frame.raw_hash), meta, None, ctx, "image"))
        return result
    if not is_dicom(job.path):
        return FileResult(skipped=True)
    try:
        ds = pydicom.dcmread(job.path, force=True)  # is_dicom accepted it, preamble or not
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged headers
        return _quarantine(anon, job, ctx, "unreadable_dicom", f"DICOM header cannot be parsed: {exc}")
    reason = anon.quarantine_reason(ds)
    if reason is not None:
        return _quarantine(anon, job, ctx, reason, f"rejected by the anonymizer: {reason}")
    res = anon.anonymize(ds, in_place=True)  # the original is not used again
    meta = dicom_meta(res.dataset, ctx.retain_device_identity)
    spacing = _spacing(res.dataset)
    try:
        for frame in read_dicom_frames(res.dataset, ctx.sampling, ctx.apply_voi, ctx.max_side):
            if frame.raw_hash in known:
                result.duplicates += 1
            else:
                result.rows.append(frame_row(frame, res.ids, meta, spacing, ctx, "dicom"))
    except DecodeError as exc:
        return _quarantine(anon, job, ctx, exc.reason, str(exc))
    return result
