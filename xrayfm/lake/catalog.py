"""DuckDB catalog over a lake's committed Parquet shards.

Views: ``images`` (every column except the image blob), ``images_all`` (with the blob; scanned
lazily, so selecting only metadata columns never reads the blobs) and ``quarantine``.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from xrayfm.lake.schema import (
    BLOB_COLUMN,
    IMAGE_SCHEMA,
    IMAGES_DIR,
    META_COLUMNS,
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
)
from xrayfm.lake.writer import LakeError, LakeLocation, open_lake


def _dataset(loc: LakeLocation, subdir: str, schema: pa.Schema) -> pads.Dataset:
    files = loc.files(subdir)
    if not files:
        return pads.dataset(schema.empty_table())
    return pads.dataset(files, schema=schema, format="parquet", filesystem=loc.fs)


def connect(lake: str | LakeLocation) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lake's views registered."""
    loc = lake if isinstance(lake, LakeLocation) else open_lake(lake)
    con = duckdb.connect()
    con.register("images_all", _dataset(loc, IMAGES_DIR, IMAGE_SCHEMA))
    con.register("quarantine", _dataset(loc, QUARANTINE_DIR, QUARANTINE_SCHEMA))
    con.execute(f"CREATE VIEW images AS SELECT * EXCLUDE ({BLOB_COLUMN}) FROM images_all")
    return con


def query(lake: str | LakeLocation, sql: str) -> pa.Table:
    """Run one SQL statement against the catalog; errors become a one-line :class:`LakeError`."""
    con = connect(lake)
    try:
        return con.sql(sql).to_arrow_table()
    except (duckdb.Error, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LakeError(f"query failed: {first}; the views are images, images_all, quarantine") from exc
    finally:
        con.close()


def read_rows(lake: str, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Rows of the lake matching the SQL predicate ``where`` (all metadata columns by default).

    Ask for ``"image"`` in ``columns`` to get the encoded blobs (decode with ``decode_image``).
    """
    cols = columns or META_COLUMNS
    unknown = [c for c in cols if c not in IMAGE_SCHEMA.names]
    if unknown:
        raise LakeError(f"unknown lake column(s) {unknown}; valid columns: {IMAGE_SCHEMA.names}")
    sql = "SELECT " + ", ".join(f'"{c}"' for c in cols) + " FROM images_all"
    if where:
        sql += f" WHERE {where}"
    return query(lake, sql + " ORDER BY image_id")


def stats(lake: str | LakeLocation) -> dict[str, Any]:
    """Counts by modality, split, source and quarantine reason, plus shard count and total size."""
    loc = lake if isinstance(lake, LakeLocation) else open_lake(lake)
    con = connect(loc)
    try:
        def counts(sql: str) -> dict[str, int]:
            return {str(k): int(v) for k, v in con.execute(sql).fetchall()}

        out: dict[str, Any] = {
            "images": int(con.execute("SELECT count(*) FROM images").fetchone()[0]),
            "patients": int(con.execute("SELECT count(DISTINCT patient_id) FROM images").fetchone()[0]),
            "by_split": counts("SELECT split, count(*) FROM images GROUP BY 1 ORDER BY 1"),
            "by_modality": counts("SELECT coalesce(modality, '(none)'), count(*) FROM images GROUP BY 1 ORDER BY 1"),
            "by_source": counts("SELECT source, count(*) FROM images GROUP BY 1 ORDER BY 1"),
            "rejected_by_reason": counts("SELECT reason, count(*) FROM quarantine GROUP BY 1 ORDER BY 1"),
        }
    finally:
        con.close()
    files = loc.files(IMAGES_DIR) + loc.files(QUARANTINE_DIR)
    out["shards"] = len(loc.files(IMAGES_DIR))
    out["total_bytes"] = int(sum(loc.fs.size(f) for f in files))
    return out


def column_values(loc: LakeLocation, subdir: str, columns: list[str]) -> list[tuple[Any, ...]]:
    """Values of a few columns over every committed shard of ``subdir`` (read shard by shard)."""
    out: list[tuple[Any, ...]] = []
    for f in loc.files(subdir):
        with loc.fs.open(f, "rb") as fh:
            t = pq.read_table(fh, columns=columns)
        out.extend(zip(*(t.column(c).to_pylist() for c in columns)))
    return out
