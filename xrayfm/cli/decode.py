"""``xrayfm decode``: decode DICOM / PNG / JPEG / TIFF files to the xrayfm image convention.

Writes one 16-bit PNG per frame (``round(image * 65535)``, dense tissue bright) and the metadata
record of each frame, so what the lake and the models will see can be inspected by eye.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from xrayfm.cli import UserError, app


@dataclass
class DecodeConfig:
    """Resolved settings of one decode run."""

    out: str
    source_count: int
    every: int = 1
    max_frames: int | None = None
    apply_voi: bool = False
    write_images: bool = True


def _source_files(sources: list[Path]) -> list[Path]:
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files.extend(sorted(p for p in src.rglob("*") if p.is_file()))
        elif src.is_file():
            files.append(src)
        else:
            raise UserError(f"source {src} does not exist; pass existing files or folders")
    if not files:
        raise UserError("no files found in the given sources; pass DICOM or PNG/JPEG/TIFF files or folders")
    return files


@app.command("decode")
def decode(
    sources: list[Path] = typer.Argument(..., help="Files or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for frame PNGs and frames.jsonl."),
    every: int = typer.Option(1, "--every", help="Multi-frame files: keep every k-th frame."),
    max_frames: int | None = typer.Option(None, "--max-frames", help="Then at most N frames per file, evenly spread."),
    voi: bool = typer.Option(False, "--voi", help="Apply the file's VOI window / VOI LUT (recorded either way)."),
    no_images: bool = typer.Option(False, "--no-images", help="Write only the metadata, no PNGs."),
) -> None:
    """Decode images to float [0, 1] dense-bright form; write 16-bit PNGs and per-frame metadata."""
    import cv2
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from xrayfm.config import atomic_write_bytes, atomic_write_text, write_run_record
    from xrayfm.conventions import to_uint16
    from xrayfm.io import DecodeError, FrameSampling, read_any

    start = time.perf_counter()
    try:
        sampling = FrameSampling(every=every, max_frames=max_frames)
    except ValueError as exc:
        raise UserError(str(exc).replace("FrameSampling.every", "--every")
                        .replace("FrameSampling.max_frames", "--max-frames")) from exc
    files = _source_files(sources)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DecodeConfig(out=str(out.resolve()), source_count=len(files), every=every, max_frames=max_frames,
                       apply_voi=voi, write_images=not no_images)
    rows: list[str] = []
    refused: list[str] = []
    console = Console(stderr=True)
    with Progress(TextColumn("decode"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("files", total=len(files))
        for n, path in enumerate(files):
            try:
                for frame in read_any(path, sampling, apply_voi=voi):
                    png = None
                    if not no_images:
                        png = f"{n:05d}_{path.stem[:40]}_f{frame.frame_index:04d}.png"
                        ok, buf = cv2.imencode(".png", to_uint16(frame.image))
                        if not ok:
                            raise UserError(f"cannot encode {png} as PNG; check the image size")
                        atomic_write_bytes(out / png, buf.tobytes())
                    rows.append(json.dumps({"file": str(path), "frame_index": frame.frame_index, "png": png,
                                            "raw_hash": frame.raw_hash, "meta": frame.meta}))
            except DecodeError as exc:
                refused.append(json.dumps({"file": str(path), "reason": exc.reason, "message": str(exc)}))
            progress.advance(task)
    atomic_write_text(out / "frames.jsonl", "".join(r + "\n" for r in rows))
    atomic_write_text(out / "refused.jsonl", "".join(r + "\n" for r in refused))
    write_run_record(out, cfg)
    for line in refused[:10]:
        console.print(json.loads(line)["message"], style="yellow", highlight=False, soft_wrap=True)
    typer.echo(f"decoded {len(rows)} frames from {len(files) - len(refused)} of {len(files)} files into {out} "
               f"({len(refused)} refused, see refused.jsonl) in {time.perf_counter() - start:.1f} s")
    if refused and not rows:
        raise typer.Exit(1)
