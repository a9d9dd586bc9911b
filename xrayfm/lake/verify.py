"""Re-read every shard of a lake, decode every image and check it against its ``image_sha``.

Verification reads only; it reports damage and changes nothing.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from xrayfm.lake.codec import CodecError, decode_image, image_sha
from xrayfm.lake.schema import IMAGES_DIR, QUARANTINE_DIR
from xrayfm.lake.writer import LakeLocation, open_lake


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_lake`; ``ok`` is False when anything is damaged."""

    shards: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)
    stale_temp_files: int = 0  # left by killed writers; invisible to readers, safe to delete

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard(loc: LakeLocation, path: str, seen: set[str], report: VerifyReport) -> None:
    name = posixpath.relpath(path, loc.root)
    try:
        with loc.fs.open(path, "rb") as fh:
            table = pq.read_table(fh, page_checksum_verification=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means the shard is damaged
        report.problems.append(f"{name}: unreadable shard ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return
    if "image" not in table.column_names:
        return
    ids = table.column("image_id").to_pylist()
    shas = table.column("image_sha").to_pylist()
    hs, ws = table.column("height").to_pylist(), table.column("width").to_pylist()
    for i, blob in enumerate(table.column("image").to_pylist()):
        report.images += 1
        if ids[i] in seen:
            report.problems.append(f"{name}: image_id {ids[i]} occurs more than once in the lake")
        seen.add(ids[i])
        try:
            arr = decode_image(blob)
        except CodecError as exc:
            report.problems.append(f"{name}: image {ids[i]}: {exc}")
            continue
        if arr.shape != (hs[i], ws[i]):
            report.problems.append(f"{name}: image {ids[i]} decodes to {arr.shape}, row says {hs[i]}x{ws[i]}")
        elif image_sha(arr) != shas[i]:
            report.problems.append(f"{name}: image {ids[i]} does not match its image_sha")


def verify_lake(lake: str | LakeLocation, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every committed shard (images and quarantine) of ``lake``; ``progress(1)`` per shard."""
    loc = lake if isinstance(lake, LakeLocation) else open_lake(lake)
    report = VerifyReport()
    seen: set[str] = set()
    for sub in (IMAGES_DIR, QUARANTINE_DIR):
        for path in loc.files(sub):
            report.shards += 1
            _check_shard(loc, path, seen, report)
            if progress:
                progress(1)
        d = loc.path(sub)
        if loc.fs.exists(d):
            report.stale_temp_files += len(loc.fs.glob(posixpath.join(d, ".*.tmp")))
    return report


def count_shards(lake: str | LakeLocation) -> int:
    """Number of committed shards :func:`verify_lake` will read (for a progress bar)."""
    loc = lake if isinstance(lake, LakeLocation) else open_lake(lake)
    return len(loc.files(IMAGES_DIR)) + len(loc.files(QUARANTINE_DIR))
