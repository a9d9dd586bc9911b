"""Where a lake lives (local path or fsspec URL) and the atomic Parquet shard writer.

Layout::

    LAKE/lake.json                      format version, max_side, codec
    LAKE/images/<name>.parquet          image rows (schema.IMAGE_SCHEMA)
    LAKE/_quarantine/<name>.parquet     rejected files (schema.QUARANTINE_SCHEMA)
    LAKE/_runs/<run_id>/                config.yaml, run.json, summary.json of each ingest run

A shard is written under a temporary name ending in ``.tmp`` in its final folder, fsynced (local
disks) and renamed; readers glob ``*.parquet`` only, so a killed writer never exposes a partial
shard.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from xrayfm.config import atomic_write_bytes
from xrayfm.lake.schema import BLOB_COLUMN, LAKE_FORMAT, LAKE_META


class LakeError(ValueError):
    """A lake path or lake content that cannot be used; the message names it and the fix."""


@dataclass
class LakeLocation:
    """A lake directory on some fsspec filesystem."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def files(self, subdir: str) -> list[str]:
        """Committed ``*.parquet`` files of a sub-folder, sorted by name."""
        d = self.path(subdir)
        if not self.fs.exists(d):
            return []
        return sorted(p for p in self.fs.glob(posixpath.join(d, "*.parquet")) if not p.endswith(".tmp"))

    def put_atomic(self, relpath: str, data: bytes) -> None:
        """Write ``data`` to ``relpath`` so that it appears complete or not at all."""
        final = self.path(relpath)
        if self.is_local:
            atomic_write_bytes(final, data)
            return
        parent = posixpath.dirname(final)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)

    def read_meta(self) -> dict[str, Any] | None:
        p = self.path(LAKE_META)
        if not self.fs.exists(p):
            return None
        return json.loads(self.fs.cat_file(p))


def open_lake(url: str, create: bool = False) -> LakeLocation:
    """Resolve ``url`` to a lake; with ``create`` a missing folder is made, else it must be a lake."""
    fs, root = url_to_fs(str(url))
    root = root.rstrip("/") or "/"
    loc = LakeLocation(url=str(url), fs=fs, root=root)
    if fs.exists(root) and not fs.isdir(root):
        raise LakeError(f"lake path {url} is a file; pass a directory (a new or an existing lake)")
    if create:
        fs.makedirs(root, exist_ok=True)
    elif loc.read_meta() is None:
        raise LakeError(f"{url} is not an xrayfm lake (no {LAKE_META}); "
                        f"create one with `xrayfm ingest SRC {url}`")
    return loc


DEFAULT_SPLIT = (0.8, 0.1, 0.1)


def ensure_lake_meta(loc: LakeLocation, max_side: int, codec: str,
                     split_fractions: Sequence[float] | None = None) -> tuple[float, float, float]:
    """Create ``lake.json`` or check that this ingest matches the existing lake's settings.

    Returns the train/val/test fractions to use: the lake's own when none are given. They are
    part of the lake: with other fractions a patient ingested again could land in another split
    and leak between train and test.
    """
    meta = loc.read_meta()
    given = None if split_fractions is None else [float(f) for f in split_fractions]
    recorded = None if meta is None else meta.get("split_fractions")
    fractions = given or recorded or list(DEFAULT_SPLIT)
    want = {"format": LAKE_FORMAT, "max_side": max_side, "codec": codec, "split_fractions": fractions}
    if meta is None:
        loc.put_atomic(LAKE_META, json.dumps(want, indent=2).encode())
        return tuple(fractions)
    if meta.get("format") != LAKE_FORMAT:
        raise LakeError(f"{loc.url} has lake format {meta.get('format')}, this xrayfm writes {LAKE_FORMAT}")
    if meta.get("max_side") != max_side:
        raise LakeError(
            f"{loc.url} stores images at max side {meta.get('max_side')}, not {max_side}; "
            f"pass --max-side {meta.get('max_side')} or ingest into a new lake"
        )
    have = recorded or list(DEFAULT_SPLIT)
    if have != fractions:
        raise LakeError(
            f"{loc.url} assigns patients to train/val/test with fractions {have}, not "
            f"{fractions}; leave out --split (or pass --split {','.join(map(str, have))}) or ingest into a new lake"
        )
    return tuple(fractions)


def _writer_options(schema: pa.Schema) -> dict[str, Any]:
    names = schema.names
    return {
        # image blobs are already compressed; compressing them again only costs time
        "compression": {n: ("none" if n == BLOB_COLUMN else "zstd") for n in names},
        "use_dictionary": [n for n in names if n != BLOB_COLUMN],
        "write_statistics": [n for n in names if n != BLOB_COLUMN],
        "write_page_checksum": True,  # lets `xrayfm lake verify` detect any damaged page
    }


class ShardWriter:
    """Streams rows into Parquet shards of at most ``rows_per_shard`` rows, each committed atomically.

    Rows are written one row group at a time to a temporary file in the shard folder, so memory
    holds one row group, not one shard; :meth:`commit` closes, fsyncs (local disks) and renames it.
    """

    def __init__(self, loc: LakeLocation, subdir: str, schema: pa.Schema, prefix: str,
                 rows_per_shard: int = 256, row_group_size: int = 32) -> None:
        if rows_per_shard < 1 or row_group_size < 1:
            raise ValueError("rows_per_shard and row_group_size must be >= 1")
        self.loc, self.subdir, self.schema, self.prefix = loc, subdir, schema, prefix
        self.rows_per_shard, self.row_group_size = rows_per_shard, min(row_group_size, rows_per_shard)
        self._rows: list[dict[str, Any]] = []
        self._seq = 0
        self._in_shard = 0
        self._tmp: str | None = None
        self._fh: Any = None
        self._writer: pq.ParquetWriter | None = None
        self.committed_rows = 0
        self.committed_files: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if self._in_shard + len(self._rows) >= self.rows_per_shard:
            self.commit()
        elif len(self._rows) >= self.row_group_size:
            self._write_group()

    def _final(self) -> str:
        return self.loc.path(self.subdir, f"{self.prefix}-{self._seq:06d}.parquet")

    def _write_group(self) -> None:
        if self._writer is None:
            final = self._final()
            parent = posixpath.dirname(final)
            self.loc.fs.makedirs(parent, exist_ok=True)
            self._tmp = posixpath.join(parent, f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")
            # stays open across add() calls until commit(), so no context manager
            self._fh = open(self._tmp, "wb") if self.loc.is_local else self.loc.fs.open(self._tmp, "wb")  # noqa: SIM115
            self._writer = pq.ParquetWriter(self._fh, self.schema, **_writer_options(self.schema))
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema),
                                 row_group_size=self.row_group_size)
        self._in_shard += len(self._rows)
        self._rows = []

    def commit(self) -> str | None:
        """Finish the open shard (with any buffered rows); return its path, None if it had no rows."""
        if self._rows:
            self._write_group()
        if self._writer is None:
            return None
        self._writer.close()
        if self.loc.is_local:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        self._fh.close()
        final = self._final()
        if self.loc.is_local:
            os.replace(self._tmp, final)
        else:
            self.loc.fs.mv(self._tmp, final)
        self.committed_rows += self._in_shard
        self.committed_files.append(posixpath.relpath(final, self.loc.root))
        self._writer = self._fh = self._tmp = None
        self._seq += 1
        self._in_shard = 0
        return final
