"""``xrayfm anonymize``: de-identified copies of DICOM files (PS3.15 Annex E Basic Profile)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from xrayfm.cli import UserError, app


@dataclass
class AnonymizeConfig:
    """Resolved settings of one run (source paths are counted, not stored: they may carry names)."""

    out: str
    key_file: str
    source_count: int
    retain_longitudinal_dates: bool = False
    retain_device_identity: bool = False
    retain_patient_characteristics: bool = False
    safe_private: list[str] = field(default_factory=list)
    admit_burned_in: bool = False


def _parse_safe_private(specs: list[str]) -> list[tuple[str, int, int]]:
    """'CREATOR,GGGG,EE' -> (creator, group, element low byte)."""
    out = []
    for spec in specs:
        parts = spec.rsplit(",", 2)
        try:
            creator, group, elem = parts[0].strip(), int(parts[1], 16), int(parts[2], 16)
        except (IndexError, ValueError):
            raise UserError(f"--safe-private {spec!r}: expected CREATOR,GGGG,EE in hex, e.g. 'ACME 1.0,0009,01'")
        if not creator or group % 2 == 0 or not 0 <= elem <= 0xFF:
            raise UserError(f"--safe-private {spec!r}: need a creator name, an odd group and an element 00-FF")
        out.append((creator, group, elem))
    return out


@app.command("anonymize")
def anonymize(
    sources: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the anonymized copies."),
    key_file: Path | None = typer.Option(
        None, "--key-file", help="Secret key (32 bytes, created 0600 if absent). Default: $XRAYFM_KEY_FILE "
        "or ~/.config/xrayfm/anonymization.key. Keep it outside --out."),
    retain_dates: bool = typer.Option(
        False, "--retain-dates", help="Shift dates by a per-patient keyed offset instead of removing them."),
    retain_device: bool = typer.Option(False, "--retain-device", help="Retain Device Identity Option."),
    retain_patient_characteristics: bool = typer.Option(
        False, "--retain-patient-characteristics", help="Keep sex, age, size, weight (Retain Patient "
        "Characteristics Option)."),
    safe_private: list[str] = typer.Option(
        [], "--safe-private", help="Keep this private element (Retain Safe Private Option): "
        "'CREATOR,GGGG,EE'. Repeatable. All other private elements are removed."),
    admit_burned_in: bool = typer.Option(
        False, "--admit-burned-in", help="Also write images flagged as burned-in annotation or secondary capture."),
) -> None:
    """Write de-identified copies of DICOM files as OUT/<patient>/<study>/<series>/<instance>.dcm."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from xrayfm.config import atomic_write_text, write_run_record
    from xrayfm.privacy import (
        AnonymizationOptions,
        Anonymizer,
        KeyFileError,
        check_key_outside,
        default_key_path,
        load_or_create_key,
    )
    from xrayfm.privacy.batch import anonymize_files, source_files

    start = time.perf_counter()
    out_root = out.expanduser().resolve()
    for src in sources:
        s = src.expanduser().resolve()
        if s.is_dir() and (out_root == s or s in out_root.parents):
            raise UserError(f"--out {out} is inside source folder {src}; choose an output folder outside the sources")
    try:
        files = source_files(sources)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    key_path = key_file if key_file is not None else default_key_path()
    try:
        check_key_outside(key_path, out_root)
        key = load_or_create_key(key_path)
    except KeyFileError as exc:
        raise UserError(str(exc)) from exc
    safe = _parse_safe_private(safe_private)
    options = AnonymizationOptions(
        retain_longitudinal_dates=retain_dates, retain_device_identity=retain_device,
        retain_patient_characteristics=retain_patient_characteristics, keep_safe_private=bool(safe),
        admit_burned_in=admit_burned_in)
    anonymizer = Anonymizer(key, options, safe_private=safe)
    cfg = AnonymizeConfig(out=str(out_root), key_file=str(Path(key_path).expanduser().resolve()),
                          source_count=len(files), retain_longitudinal_dates=retain_dates,
                          retain_device_identity=retain_device,
                          retain_patient_characteristics=retain_patient_characteristics,
                          safe_private=safe_private, admit_burned_in=admit_burned_in)
    console = Console(stderr=True)
    with Progress(TextColumn("anonymize"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("files", total=len(files))
        summary = anonymize_files(files, out_root, anonymizer, on_file=lambda _: progress.advance(task))
    for line in summary.problems[:20]:
        console.print(f"[yellow]{line}[/yellow]", highlight=False)
    if len(summary.problems) > 20:
        console.print(f"... and {len(summary.problems) - 20} more")
    seconds = time.perf_counter() - start
    out_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_root / "anonymize_summary.json",
                      json.dumps({**summary.counts(), "seconds": round(seconds, 3)}, indent=2))
    write_run_record(out_root, cfg, record_command=False)
    quarantined = sum(summary.quarantined.values())
    typer.echo(f"anonymized {summary.written} of {len(files)} files into {out_root} "
               f"({quarantined} quarantined, {summary.not_dicom} not DICOM, {summary.errors} errors) "
               f"in {seconds:.1f} s")
    if summary.errors and not summary.written:
        raise typer.Exit(1)
