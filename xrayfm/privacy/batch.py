"""Anonymize many DICOM files into a folder tree named only by pseudonyms.

Output layout: ``OUT/<patient>/<study>/<series>/<instance>.dcm`` (keyed pseudonyms), written
atomically. Quarantined files are not written. Source paths may themselves carry names, so they
are reported to the caller (for the console) and never written under ``OUT``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from xrayfm.config import atomic_write_bytes
from xrayfm.privacy.anonymizer import Anonymizer, PseudoIds


@dataclass
class BatchSummary:
    """Counts of one batch; ``problems`` holds 'path: reason' lines for the console only."""

    written: int = 0
    not_dicom: int = 0
    errors: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, object]:
        """The summary without file paths, safe to store next to anonymized data."""
        return {"written": self.written, "not_dicom": self.not_dicom, "errors": self.errors,
                "quarantined": dict(sorted(self.quarantined.items()))}


def source_files(sources: Iterable[str | Path]) -> list[Path]:
    """Every regular file named by ``sources`` (folders are searched recursively), sorted."""
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"source {p} does not exist; pass existing DICOM files or folders")
    return files


def output_path(out: str | Path, ids: PseudoIds) -> Path:
    return Path(out) / ids.patient / ids.study / ids.series / f"{ids.instance}.dcm"


def anonymize_file(path: Path, out: Path, anonymizer: Anonymizer, summary: BatchSummary) -> None:
    """Anonymize one file into ``out``, recording the outcome in ``summary``."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        summary.not_dicom += 1
        return
    except Exception as exc:  # noqa: BLE001 - a corrupt file must not stop the batch
        summary.errors += 1
        summary.problems.append(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})".splitlines()[0])
        return
    reason = anonymizer.quarantine_reason(ds)
    if reason is not None:
        summary.quarantined[reason] = summary.quarantined.get(reason, 0) + 1
        summary.problems.append(f"{path}: quarantined ({reason}); pass --admit-burned-in to admit it")
        return
    try:
        result = anonymizer.anonymize(ds)
        buf = io.BytesIO()
        result.dataset.save_as(buf, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - reported per file, the batch goes on
        summary.errors += 1
        summary.problems.append(f"{path}: cannot anonymize ({type(exc).__name__}: {exc})".splitlines()[0])
        return
    atomic_write_bytes(output_path(out, result.ids), buf.getvalue())
    summary.written += 1


def anonymize_files(files: Iterable[Path], out: str | Path, anonymizer: Anonymizer,
                    on_file: Callable[[Path], None] | None = None) -> BatchSummary:
    """Anonymize ``files`` into ``out``; ``on_file`` is called after each (progress bars)."""
    summary = BatchSummary()
    for path in files:
        anonymize_file(path, Path(out), anonymizer, summary)
        if on_file is not None:
            on_file(path)
    return summary
