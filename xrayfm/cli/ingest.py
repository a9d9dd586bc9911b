"""``xrayfm ingest SRC... --lake LAKE``: anonymize DICOM/PNG/JPEG/TIFF files into an image lake."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xrayfm.cli import UserError, app

_Opt = typer.Option


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--split {text!r}: give three fractions such as 0.8,0.1,0.1") from None


@app.command("ingest")
def ingest_cmd(
    paths: Annotated[list[str], typer.Argument(help="Source files or folders (then the lake last, unless "
                                               "--lake is given).")],
    lake: Annotated[str | None, _Opt("--lake", help="Lake folder or fsspec URL.")] = None,
    config: Annotated[Path | None, _Opt(help="YAML IngestConfig; options given here override it.")] = None,
    key_file: Annotated[str | None, _Opt(help="Pseudonymisation key (default $XRAYFM_KEY_FILE or "
                                         "~/.config/xrayfm/anonymization.key, created on first use).")] = None,
    source: Annotated[str | None, _Opt(help="Dataset label stored in every row (default: \"default\").")] = None,
    max_side: Annotated[int | None, _Opt(help="Longer side of stored images, never upsampled [512].")] = None,
    frame_every: Annotated[int | None, _Opt(help="Keep every k-th frame of multi-frame files [1].")] = None,
    max_frames: Annotated[int | None, _Opt(help="Then at most N frames per file, evenly spread.")] = None,
    apply_voi: Annotated[bool | None, _Opt("--apply-voi/--no-apply-voi", help="Apply the VOI LUT/window.")] = None,
    retain_device_identity: Annotated[bool | None, _Opt(
        "--retain-device-identity/--no-retain-device-identity",
        help="Keep manufacturer, model and device serial number.")] = None,
    admit_burned_in: Annotated[bool | None, _Opt(
        "--admit-burned-in/--no-admit-burned-in",
        help="Admit images flagged as carrying burned-in annotation (pixels are NOT cleaned).")] = None,
    split: Annotated[str | None, _Opt(help="Patient-level train,val,test fractions [0.8,0.1,0.1].")] = None,
    workers: Annotated[int | None, _Opt(help="Decode/encode processes [1].")] = None,
    shard_index: Annotated[int | None, _Opt(help="This node's index in a job array [0].")] = None,
    num_shards: Annotated[int | None, _Opt(help="Number of nodes in the job array [1].")] = None,
    rows_per_shard: Annotated[int | None, _Opt(help="Images per committed shard [256].")] = None,
    report_file: Annotated[str | None, _Opt(help="Local JSONL naming rejected files by path (may carry PHI; "
                                            "never written into the lake).")] = None,
) -> None:
    """Ingest files into an anonymized lake; re-running adds nothing new, a killed run resumes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from xrayfm.config import ConfigError, from_dict, load_yaml, to_dict
    from xrayfm.lake.ingest import IngestConfig, ingest, single_core_process
    from xrayfm.lake.writer import LakeError
    from xrayfm.privacy import KeyFileError

    if lake is None:
        if len(paths) < 2:
            raise UserError("give at least one source and the lake: xrayfm ingest SRC [SRC...] --lake LAKE")
        *sources, lake = paths
    else:
        sources = list(paths)
    single_core_process()  # this process only ingests
    given = {"key_file": key_file, "source": source, "max_side": max_side, "frame_every": frame_every,
             "max_frames": max_frames, "apply_voi": apply_voi, "retain_device_identity": retain_device_identity,
             "admit_burned_in": admit_burned_in, "workers": workers, "shard_index": shard_index,
             "num_shards": num_shards, "rows_per_shard": rows_per_shard, "report_file": report_file,
             "split_fractions": _fractions(split) if split is not None else None}
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        base = load_yaml(IngestConfig, config) if config else IngestConfig()
        cfg = from_dict(IngestConfig, {**to_dict(base), **overrides})
        with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task("ingest", total=None)
            summary = ingest(sources, lake, cfg, progress=lambda done, total: bar.update(task, completed=done,
                                                                                        total=total))
    except (ConfigError, LakeError, KeyFileError) as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    print(summary.line())
