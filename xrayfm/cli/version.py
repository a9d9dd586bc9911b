"""``xrayfm version``: print the versions that decide results."""

from __future__ import annotations

import json

from xrayfm.cli import app


@app.command("version")
def version() -> None:
    """Print xrayfm's version and the versions of the libraries it runs on."""
    from xrayfm.config import versions

    print(json.dumps(versions(), indent=2))
