"""``xrayfm lake stats|query|show|verify``: look into a lake without changing it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from xrayfm.cli import UserError, app

lake_app = typer.Typer(help="Inspect an image lake: counts, SQL queries, single images, integrity.",
                       no_args_is_help=True)
app.add_typer(lake_app, name="lake")

LakeArg = Annotated[str, typer.Argument(help="Lake folder or fsspec URL (file://, memory://, s3://...).")]


def _fail(exc: Exception) -> UserError:
    return UserError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


@lake_app.command("stats")
def stats_cmd(lake: LakeArg,
              as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False) -> None:
    """Counts by split, modality, source and rejection reason; shards and total size."""
    from xrayfm.lake import LakeError, stats

    try:
        s = stats(lake)
    except LakeError as exc:
        raise _fail(exc) from exc
    if as_json:
        print(json.dumps(s, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("group", "value", "count", title=f"lake {lake}")
    for group in ("by_split", "by_modality", "by_source", "rejected_by_reason"):
        for k, v in s[group].items():
            table.add_row(group.removeprefix("by_").removeprefix("rejected_by_"), k, str(v))
    Console().print(table)
    print(f"{s['images']} images of {s['patients']} patients in {s['shards']} shards, "
          f"{sum(s['rejected_by_reason'].values())} rejected files, {s['total_bytes'] / 2**20:.1f} MiB")


@lake_app.command("query")
def query_cmd(lake: LakeArg,
              sql: Annotated[str, typer.Argument(help="SQL over the views images, images_all, quarantine.")],
              limit: Annotated[int, typer.Option(help="Print at most this many rows.")] = 50,
              csv: Annotated[Path | None, typer.Option(help="Also write all result rows to this CSV.")] = None,
              ) -> None:
    """Run SQL against the catalog, e.g. "SELECT split, count(*) FROM images GROUP BY 1"."""
    from xrayfm.lake import LakeError, query

    try:
        table = query(lake, sql)
    except LakeError as exc:
        raise _fail(exc) from exc
    if "image" in table.column_names:
        table = table.drop_columns(["image"])  # blobs are not printable
    if csv is not None:
        import io

        import pyarrow.csv as pacsv

        from xrayfm.config import atomic_write_bytes

        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        atomic_write_bytes(csv, buf.getvalue())
    from rich.console import Console
    from rich.table import Table

    out = Table(*table.column_names)
    for row in table.slice(0, limit).to_pylist():
        out.add_row(*("" if v is None else str(v) for v in row.values()))
    Console(width=200).print(out)
    print(f"{table.num_rows} rows" + (f" (first {limit} shown)" if table.num_rows > limit else ""))


@lake_app.command("show")
def show_cmd(lake: LakeArg, image_id: Annotated[str, typer.Argument(help="image_id of the row to export.")],
             out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
             eight_bit: Annotated[bool, typer.Option("--8bit", help="Write an 8-bit PNG (default 16-bit).")] = False,
             ) -> None:
    """Write one stored image to a PNG file (16-bit as stored, or 8-bit for viewing)."""
    import cv2
    import numpy as np

    from xrayfm.config import atomic_write_bytes
    from xrayfm.lake import LakeError, decode_image, read_rows

    try:
        t = read_rows(lake, where=f"image_id = '{image_id.replace(chr(39), chr(39) * 2)}'",
                      columns=["image_id", "image"])
    except LakeError as exc:
        raise _fail(exc) from exc
    if t.num_rows == 0:
        raise UserError(f"no image with image_id {image_id!r} in {lake}; list ids with `xrayfm lake query`")
    img = decode_image(t.column("image")[0].as_py())
    if eight_bit:
        img = np.round(img.astype(np.float32) / 257.0).astype(np.uint8)
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise UserError(f"could not encode {image_id} as PNG")
    atomic_write_bytes(out, png.tobytes())
    print(f"wrote {out} ({img.shape[1]}x{img.shape[0]}, {'8' if eight_bit else '16'}-bit)")


@lake_app.command("verify")
def verify_cmd(lake: LakeArg) -> None:
    """Re-read every shard and decode every image against its image_sha; exit 1 on damage."""
    from rich.progress import Progress

    from xrayfm.lake import LakeError, verify_lake
    from xrayfm.lake.verify import count_shards

    try:
        total = count_shards(lake)
        with Progress(transient=True) as bar:
            task = bar.add_task("verifying shards", total=total)
            report = verify_lake(lake, progress=lambda n: bar.advance(task, n))
    except LakeError as exc:
        raise _fail(exc) from exc
    for p in report.problems:
        typer.echo(f"damaged: {p}", err=True)
    stale = f", {report.stale_temp_files} stale temporary files (safe to delete)" if report.stale_temp_files else ""
    status = "OK" if report.ok else f"DAMAGED ({len(report.problems)} problems)"
    print(f"{status}: {report.shards} shards, {report.images} images checked{stale}")
    if not report.ok:
        raise typer.Exit(1)
