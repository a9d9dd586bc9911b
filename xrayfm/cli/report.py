"""``xrayfm report``: one self-contained HTML file from runs, metrics and sample predictions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from xrayfm.cli import UserError, app


@app.command("report")
def report_cmd(
    out: Annotated[Path, typer.Option(help="HTML file to write.")],
    runs: Annotated[
        list[Path] | None,
        typer.Option("--runs", help="Pretrain run folder(s) (metrics.jsonl, model_card.json)."),
    ] = None,
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics",
            help="`xrayfm evaluate` JSON, as PATH or LABEL=PATH; repeat. One label at several "
            "label fractions gives a curve.",
        ),
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model bundle for the sample figures (Figure 2, attention).")
    ] = None,
    images: Annotated[
        list[Path] | None, typer.Option("--images", help="Sample image files or folders (with --model).")
    ] = None,
    attention_backbone: Annotated[
        Path | None,
        typer.Option(help="ViT pretrain run (or bundle) whose CLS attention is drawn on the sample images, "
                     "when the --model bundle is not a ViT."),
    ] = None,
    max_images: Annotated[int, typer.Option(help="Most sample images.")] = 6,
    title: Annotated[str, typer.Option(help="Report title.")] = "xrayfm report",
) -> None:
    """Write the report: Figure 2 panels, results table vs baselines, label efficiency, confusion matrix,
    pretraining loss, ViT CLS attention, PCA embedding map and provenance."""
    from rich.progress import Progress

    from xrayfm.config import atomic_write_text, versions, write_run_record
    from xrayfm.io import DecodeError
    from xrayfm.report.html import build_report
    from xrayfm.report.inputs import load_metrics, load_run, predict_samples
    from xrayfm.serve.files import list_inputs

    runs, metrics, images = runs or [], metrics or [], images or []
    if images and model is None:
        raise UserError("--images needs --model BUNDLE to predict on them")
    if max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {max_images}")
    t0 = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("report", total=len(runs) + len(metrics) + (1 if model else 0) + 1)
        try:
            run_infos = []
            for r in runs:
                run_infos.append(load_run(r))
                bar.advance(task)
            docs = []
            for m in metrics:
                docs.append(load_metrics(m))
                bar.advance(task)
            samples, class_names = [], []
            if model is not None:
                from xrayfm.models.bundle import ModelBundle

                bundle = ModelBundle.load(model)
                class_names = bundle.class_names
                vit = None
                if attention_backbone is not None:
                    from xrayfm.models.backbones import ViTBackbone
                    from xrayfm.models.card import load_backbone

                    backbone, card = load_backbone(str(attention_backbone))
                    if not isinstance(backbone, ViTBackbone):
                        raise UserError(f"--attention-backbone {attention_backbone} is a {card['arch']}, not a ViT; "
                                        "pass a ViT pretrain run")
                    vit = (backbone, int(card["input_size"]))
                samples = predict_samples(bundle, [f for f, _ in list_inputs(images)], max_images,
                                          attention_backbone=vit)
                bar.advance(task)
            if not class_names:
                from xrayfm.synth.regions import REGIONS

                class_names = list(REGIONS)
            prov = {
                "command": "xrayfm report",
                "runs": [str(r) for r in runs],
                "metrics": list(metrics),
                "model": str(model) if model else None,
                "n_sample_images": len(samples),
                "versions": versions(),
            }
            page = build_report(run_infos, docs, samples, class_names, prov, title)
        except (ValueError, FileNotFoundError, DecodeError) as exc:
            raise UserError(str(exc).splitlines()[0]) from exc
        prov["build_s"] = round(time.perf_counter() - t0, 2)
        atomic_write_text(out, page)
        bar.advance(task)
    write_run_record(out.parent / f"{out.stem}_run", prov, record_command=False)
    print(
        f"report {out}: {len(run_infos)} run(s), {len(docs)} metrics file(s), "
        f"{len(samples)} sample image(s), "
        f"{out.stat().st_size / 1024:.0f} KiB in {time.perf_counter() - t0:.1f} s"
    )
