"""``xrayfm serve``: the model bundle as a web service with a viewer page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xrayfm.cli import TTA_HELP, UserError, app


@app.command("serve")
def serve_cmd(
    model: Annotated[Path, typer.Option(help="Model bundle folder (`xrayfm bundle`).")],
    host: Annotated[str, typer.Option(help="Interface to listen on (localhost by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="XRAYFM_TOKEN", help="Require 'Authorization: Bearer TOKEN' on /v1/* (env XRAYFM_TOKEN)."
        ),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest accepted upload; bigger ones get 413.")
    ] = 50.0,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long to gather concurrent requests into one batch.")
    ] = 10.0,
    max_batch: Annotated[int, typer.Option(help="Most frames per backbone pass.")] = 8,
    max_frames: Annotated[
        int, typer.Option(help="Multi-frame uploads: at most N frames, evenly spread.")
    ] = 16,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda or auto.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 (as evaluated), bf16 or auto (bf16 on a GPU or a CPU "
                                           "with fast bf16): the forward pass under autocast.")] = "fp32",
    tta: Annotated[str, typer.Option(help=TTA_HELP)] = "none",
) -> None:
    """Serve POST /v1/predict, GET /v1/model, GET /healthz, the viewer at / and OpenAPI docs at /docs."""
    import uvicorn

    from xrayfm.models.bundle import ModelBundle
    from xrayfm.serve.app import create_app

    if max_upload_mb <= 0 or max_batch < 1 or max_frames < 1 or batch_window_ms < 0:
        raise UserError(
            "--max-upload-mb must be > 0, --max-batch and --max-frames >= 1, --batch-window-ms >= 0"
        )
    try:
        bundle = ModelBundle.load(model, device, precision, tta)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        typer.echo(
            f"warning: serving on {host} without --token: anyone who reaches the port can use it", err=True
        )
    api = create_app(bundle, token, max_upload_mb, batch_window_ms, max_batch, max_frames)
    print(
        f"serving {bundle.card()['arch']} ({', '.join(bundle.heads)}) at http://{host}:{port}/ "
        f"(API docs /docs); Ctrl-C stops"
    )
    uvicorn.run(api, host=host, port=port, log_level="warning")
    b = api.state.batcher
    print(f"served {b.images} frame(s) in {b.batches} batch(es)")
