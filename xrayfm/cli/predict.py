"""``xrayfm bundle`` (assemble a model bundle) and ``xrayfm predict`` (run it on files)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from xrayfm.cli import TTA_HELP, UserError, app


@dataclass
class PredictConfig:
    """Resolved settings of one ``xrayfm predict`` run."""

    model: str
    n_inputs: int
    every: int = 1
    max_frames: int | None = None
    batch_size: int = 8
    overlay: bool = True
    dicom_seg: bool = False
    dicom_sr: bool = False
    bundle: dict[str, Any] = field(default_factory=dict)


@app.command("bundle")
def bundle_cmd(
    backbone: Annotated[
        Path, typer.Option(help="Pretrain run folder or exported backbone folder (model_card.json).")
    ],
    heads: Annotated[
        list[Path],
        typer.Option(
            "--heads",
            help="Head bundle folder(s) from `xrayfm heads train`; repeat for classify, segment, detect.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    detect_threshold: Annotated[float | None, typer.Option(
        help="Screw confidence threshold [the detect head's val-tuned operating point, else 0.3].")] = None,
    mask_threshold: Annotated[float | None, typer.Option(
        help="Metal probability threshold for the mask [the segment head's val-tuned one, else 0.5].")] = None,
    mask_min_area: Annotated[float | None, typer.Option(
        help="Drop mask components smaller than this fraction of the image area, e.g. 0.0005 "
             "[the segment head's val-tuned one, else 0].")] = None,
) -> None:
    """Assemble backbone + heads into ONE model bundle folder that predict and serve load."""
    from xrayfm.config import write_run_record
    from xrayfm.models.bundle import ModelBundle

    try:
        path = ModelBundle.create(backbone, heads, out, detect_threshold, mask_threshold, mask_min_area)
        b = ModelBundle.load(path)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    write_run_record(
        path,
        {
            "backbone": str(backbone),
            "heads": [str(h) for h in heads],
            "detect_threshold": b.options["detect_threshold"],
            "mask_threshold": b.options["mask_threshold"],
            "mask_min_area": b.options["mask_min_area"],
        },
    )
    print(f"bundle {path}: {b.card()['arch']} at {b.input_size} px with heads {', '.join(b.heads)}")


@app.command("predict")
def predict_cmd(
    inputs: Annotated[
        list[Path], typer.Argument(help="DICOM (single/multi-frame), PNG/JPEG/TIFF files or folders.")
    ],
    model: Annotated[Path, typer.Option(help="Model bundle folder (`xrayfm bundle`).")],
    out: Annotated[
        Path, typer.Option(help="Output folder: one JSON per file, mask and overlay PNGs per frame.")
    ],
    every: Annotated[int, typer.Option(help="Multi-frame files: keep every k-th frame.")] = 1,
    max_frames: Annotated[
        int | None, typer.Option(help="Multi-frame files: at most N frames, evenly spread.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Frames per backbone pass.")] = 8,
    overlay: Annotated[bool, typer.Option("--overlay/--no-overlay", help="Write overlay PNGs.")] = True,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda or auto.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 (as evaluated), bf16 or auto (bf16 on a GPU or a CPU "
                                           "with fast bf16): the forward pass under autocast.")] = "fp32",
    tta: Annotated[str, typer.Option(help=TTA_HELP)] = "none",
    dicom_seg: Annotated[
        bool,
        typer.Option(
            "--dicom-seg", help="Also write the metal mask as DICOM SEG (single-frame DICOM inputs)."
        ),
    ] = False,
    dicom_sr: Annotated[
        bool,
        typer.Option(
            "--dicom-sr", help="Also write the findings as a DICOM SR per frame of DICOM inputs (TID 1500)."
        ),
    ] = False,
) -> None:
    """Run a model bundle on images: top-3 regions, metal mask (PNG + RLE) and screws per frame.

    Exit code 1 when any input file failed (the others are still predicted)."""
    from rich.progress import Progress

    from xrayfm.config import write_run_record
    from xrayfm.io import DecodeError, FrameSampling
    from xrayfm.models.bundle import ModelBundle
    from xrayfm.serve.files import FilePredictor, list_inputs

    if batch_size < 1 or every < 1 or (max_frames is not None and max_frames < 1):
        raise UserError("--batch-size, --every and --max-frames must be >= 1")
    try:
        bundle = ModelBundle.load(model, device, precision, tta)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    try:
        files = list_inputs(inputs)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    cfg = PredictConfig(
        str(model), len(files), every, max_frames, batch_size, overlay, dicom_seg, dicom_sr, bundle.card()
    )
    out.mkdir(parents=True, exist_ok=True)
    # Input paths may name patients: record the verb only, not the command line.
    write_run_record(out, cfg, record_command=False)
    t0 = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("predicting", total=len(files))

        def error(exc: DecodeError) -> None:
            bar.console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)

        def note(msg: str) -> None:
            bar.console.print(f"note: {msg}", markup=False, highlight=False, soft_wrap=True)

        runner = FilePredictor(
            bundle,
            out,
            batch_size,
            FrameSampling(every, max_frames),
            overlay,
            dicom_seg,
            dicom_sr,
            on_error=error,
            on_note=note,
            on_file=lambda: bar.advance(task),
        )
        runner.run(files)
    n_frames, failed = runner.frames_done, runner.files_failed
    dt = time.perf_counter() - t0
    print(
        f"predicted {n_frames} frame(s) from {len(files) - failed} of {len(files)} file(s) "
        f"({failed} failed) in {dt:.1f} s -> {out}"
    )
    if failed:
        raise typer.Exit(1)
