"""The ``xrayfm`` command line: a thin skin over the Python API.

Each verb group lives in its own module and registers itself on :data:`app`. Heavy libraries
(torch, pyarrow, pydicom) are imported inside the commands so ``xrayfm --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="xrayfm",
    help="X-ray foundation models: ingest DICOM into an anonymized lake, synthesise C-arm data, "
    "pretrain, adapt heads, evaluate, predict and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """X-ray foundation models: ingest, synth, pretrain, heads, evaluate, predict, serve."""


TTA_HELP = ("Test-time augmentation: none, flip (average each head over the image and its mirror; "
            "helps heads trained with --augment) or dihedral (all 8 rot90/mirror copies, for heads "
            "trained with --dihedral); 1, 2 or 8 forward passes.")


class UserError(Exception):
    """An error caused by input the user can fix; printed as one line, exit code 2."""


def _register() -> None:
    # One import per verb group; each module calls app.command()/app.add_typer() itself.
    from xrayfm.cli import version  # noqa: F401
    from xrayfm.cli import data, synth  # noqa: F401
    from xrayfm.cli import anonymize  # noqa: F401
    from xrayfm.cli import decode  # noqa: F401
    from xrayfm.cli import ingest, lake  # noqa: F401
    from xrayfm.cli import pretrain  # noqa: F401
    from xrayfm.cli import heads  # noqa: F401
    from xrayfm.cli import predict, report, serve  # noqa: F401
    from xrayfm.cli import demo  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
