"""``xrayfm synth``: synthetic C-arm studies (DICOM + labels.parquet) rendered from a CT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xrayfm.cli import UserError, app

_Opt = typer.Option


def _screw_range(text: str) -> tuple[int, int]:
    parts = text.split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (-1, -1)
    except ValueError:
        lo, hi = -1, -1
    if not 0 <= lo <= hi:
        raise UserError(f"--screws {text!r}: give a count or a range like 0-4 (0 <= lo <= hi)")
    return lo, hi


@app.command("synth")
def synth_cmd(
    out: Annotated[Path, _Opt(help="Output folder (dicom/, labels.parquet, config.yaml, run.json).")],
    ct: Annotated[str, _Opt(help="'demo' (after `xrayfm data fetch`), a NIfTI file, a DICOM series folder, "
                            "or a .npy/.npz array.")] = "demo",
    labels: Annotated[str | None, _Opt(help="Label map (NIfTI, same grid) for a user CT.")] = None,
    region: Annotated[str | None, _Opt(help="Body region when the rules cannot name one (required without "
                                       "labels), e.g. lower_limb.")] = None,
    n: Annotated[int, _Opt(help="Number of images.")] = 16,
    size: Annotated[int, _Opt(help="Image side in pixels (multiple of 32).")] = 256,
    seed: Annotated[int, _Opt(help="Run seed: same seed, same pixels.")] = 0,
    screws: Annotated[str, _Opt(help="Pedicle screws per study: N or LO-HI.")] = "0-4",
    images_per_study: Annotated[int, _Opt(help="Images per fake patient/study.")] = 8,
    voxel_mm: Annotated[float, _Opt(help="Rendering voxel size in mm (coarser = faster).")] = 1.0,
    workers: Annotated[int, _Opt(help="Parallel render processes.")] = 1,
    balance_regions: Annotated[bool, _Opt("--balance-regions/--natural-regions",
                                          help="Draw each image's body region uniformly from those the CT "
                                          "shows, or let the view sampler's natural mix stand.")] = True,
    region_margin: Annotated[float, _Opt(help="Redraw views whose body region changes when the C-arm moves "
                                         "this many pixels (0: off): a well-posed region label, without "
                                         "the borderline views.")] = 0.0,
    spacing: Annotated[str, _Opt(help="Voxel spacing 'x,y,z' mm of a raw .npy/.npz volume.")] = "1,1,1",
    hu_offset: Annotated[float, _Opt(help="Added to raw .npy/.npz values to get HU.")] = 0.0,
    cache: Annotated[str | None, _Opt(help="Demo CT cache folder (default $XRAYFM_CACHE/demo_ct or "
                                      "~/.cache/xrayfm/demo_ct).")] = None,
) -> None:
    """Render synthetic mobile C-arm studies with exact labels; resumes an interrupted run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from xrayfm.config import write_run_record
    from xrayfm.io.volume import VolumeError
    from xrayfm.synth.demo_data import DemoDataError
    from xrayfm.synth.generate import SynthConfig, generate, load_ct, prepare_base

    try:
        sp = tuple(float(v) for v in spacing.split(","))
    except ValueError:
        sp = ()
    if len(sp) != 3 or min(sp) <= 0:
        raise UserError(f"--spacing {spacing!r}: give three positive numbers like 0.8,0.8,1.5")
    if workers < 1 or images_per_study < 1:
        raise UserError("--workers and --images-per-study must be at least 1")
    if region_margin < 0:
        raise UserError(f"--region-margin {region_margin:g}: give 0 (off) or a positive number of pixels")
    cfg = SynthConfig(out=str(out), ct=ct, labels=labels, region=region, n=n, size=size, seed=seed,
                      screws=_screw_range(screws), images_per_study=images_per_study, voxel_mm=voxel_mm,
                      workers=workers, spacing=sp, hu_offset=hu_offset, cache=cache,
                      balance_regions=balance_regions, region_margin_px=region_margin)  # type: ignore[arg-type]
    try:
        with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task("load CT", total=n)
            base = prepare_base(cfg, load_ct(cfg))
            summary = generate(cfg, progress=lambda k: bar.advance(task, k), base=base)
    except (DemoDataError, VolumeError, ValueError) as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    write_run_record(out, cfg, seed=seed, extra={"summary": summary.__dict__})
    regions = ", ".join(f"{k} {v}" for k, v in sorted(summary.regions.items()))
    print(f"synth: {summary.n_written} images written, {summary.n_skipped} already present, "
          f"{summary.n_patients} patients, {summary.n_screws} screw labels ({regions}) in {summary.seconds:.1f} s "
          f"-> {out}")
