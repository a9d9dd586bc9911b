"""The self-contained HTML report: one file, every image inline as a base64 PNG, no external links.

Sections (each always present; one with no inputs says which option supplies them):
Figure 2 (sample predictions), results table, label efficiency, confusion matrix, pretraining
loss, CLS attention, embedding map, provenance.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from xrayfm.report import figures
from xrayfm.report.analysis import pca_2d
from xrayfm.report.inputs import MetricsDoc, RunInfo, Sample

SECTIONS = (
    ("figure2", "Figure 2: sample predictions"),
    ("results", "Results: backbones and baselines"),
    ("label-efficiency", "Label efficiency"),
    ("confusion", "Confusion matrix"),
    ("pretraining", "Pretraining loss"),
    ("attention", "ViT CLS attention (last block)"),
    ("embedding", "Embedding map (PCA)"),
    ("provenance", "Provenance"),
)

# (column title, section, key, format)
COLUMNS = (
    ("accuracy", "classification", "accuracy", "{:.3f}"),
    ("macro recall", "classification", "recall_macro", "{:.3f}"),
    ("top-3 acc", "classification", "top3_accuracy", "{:.3f}"),
    ("macro F1", "classification", "f1_macro", "{:.3f}"),
    ("kNN acc", "classification", "knn_accuracy", "{:.3f}"),
    ("Dice", "segmentation", "dice_mean", "{:.3f}"),
    ("Dice (images with metal)", "segmentation", "dice_positive_mean", "{:.3f}"),
    ("boundary Dice", "segmentation", "boundary_dice_mean", "{:.3f}"),
    ("screw AP", "detection", "ap", "{:.3f}"),
    ("head err mm", "detection", "head_error_mm", "{:.2f}"),
    ("head err px", "detection", "head_error_px", "{:.2f}"),
    ("angle err °", "detection", "angle_error_deg", "{:.1f}"),
    ("angle err median °", "detection", "angle_error_median_deg", "{:.1f}"),
)
BASELINES = {
    "knn": "kNN on features",
    "pca_svm_features": "PCA+SVM on features",
    "pca_svm_pixels": "PCA+SVM on 32 px pixels (classical)",
}

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem}
th{background:#f2f2f2}td.num{text-align:right}img{max-width:100%}pre{background:#f7f7f7;padding:.5rem;
overflow-x:auto;font-size:.8rem}.missing{color:#888;font-style:italic}"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _missing(what: str) -> str:
    return f'<p class="missing">{_e(what)}</p>'


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return '<td class="num">–</td>'
    return f'<td class="num">{_e(fmt.format(value))}</td>'


def _main_docs(metrics: Sequence[MetricsDoc]) -> list[MetricsDoc]:
    """One document per label: the full-label one (fraction 1 or unknown), else the largest fraction."""

    def rank(m: MetricsDoc) -> float:
        return 2.0 if m.label_fraction is None or m.label_fraction == 1.0 else m.label_fraction

    best: dict[str, MetricsDoc] = {}
    for m in metrics:
        cur = best.get(m.label)
        if cur is None or rank(m) > rank(cur):
            best[m.label] = m
    return list(best.values())


def results_table(metrics: Sequence[MetricsDoc]) -> str:
    """HTML table: one row per labelled document, then its classification baselines."""
    head = "".join(f"<th>{_e(c[0])}</th>" for c in COLUMNS)
    rows = []
    seen_pixels = False
    for m in _main_docs(metrics):
        cells = "".join(_cell((m.doc.get(sec) or {}).get(key), fmt) for _, sec, key, fmt in COLUMNS)
        rows.append(f"<tr><td>{_e(m.label)}</td>{cells}</tr>")
        for name, vals in ((m.doc.get("classification") or {}).get("baselines") or {}).items():
            if name == "pca_svm_pixels":
                if seen_pixels:
                    continue
                seen_pixels, label = True, BASELINES[name]
            else:
                label = f"{m.label} · {BASELINES.get(name, name)}"
            cells = "".join(
                _cell(vals.get(key) if sec == "classification" and key != "knn_accuracy" else None, fmt)
                for _, sec, key, fmt in COLUMNS
            )
            rows.append(f"<tr><td>{_e(label)}</td>{cells}</tr>")
    return f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def label_efficiency_series(
    metrics: Sequence[MetricsDoc],
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{metric title: {label: (fractions, values)}}`` for labels evaluated at >= 2 fractions."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for title, sec, key in (
        ("classification accuracy", "classification", "accuracy"),
        ("segmentation Dice", "segmentation", "dice_mean"),
        ("screw AP", "detection", "ap"),
    ):
        for label in sorted({m.label for m in metrics}):
            pts = sorted(
                (float(m.label_fraction), float(m.doc[sec][key]))
                for m in metrics  # type: ignore[arg-type]
                if m.label == label
                and m.label_fraction is not None
                and (m.doc.get(sec) or {}).get(key) is not None
            )
            if len({x for x, _ in pts}) >= 2:
                out.setdefault(title, {})[label] = ([x for x, _ in pts], [y for _, y in pts])
    return out


def _provenance(runs: Sequence[RunInfo], metrics: Sequence[MetricsDoc], extra: dict[str, Any]) -> str:
    parts = []
    for r in runs:
        versions = r.run.get("versions") or r.card.get("versions") or {}
        timing = {k: v for k, v in r.last.items() if k in ("step", "epoch", "images_per_s")}
        setup = {k: v for k, v in r.run.items() if k in ("device", "precision", "world_size", "seed")}
        parts.append(
            f"<h3>{_e(r.name)}</h3><p>data: {_e(json.dumps(r.card.get('training_data'), default=str))}"
            f"<br>last logged step: {_e(json.dumps(timing))}<br>started: {_e(r.run.get('time', '?'))}"
            f"<br>setup: {_e(json.dumps(setup, default=str))}<br>versions: {_e(json.dumps(versions))}</p>"
            f"<pre>{_e(r.config_text or 'no config.yaml')}</pre>"
        )
    for m in metrics:
        parts.append(
            f"<p>metrics <b>{_e(m.label)}</b> from {_e(m.source)}: split {_e(m.doc.get('split', '?'))}, "
            f"{_e(m.doc.get('n_images', '?'))} images, label fraction {_e(m.label_fraction)}, "
            f"heads {_e(json.dumps(m.doc.get('heads', {})))}</p>"
        )
    parts.append(f"<pre>{_e(json.dumps(extra, indent=1, default=str))}</pre>")
    return "".join(parts)


def build_report(
    runs: Sequence[RunInfo] = (),
    metrics: Sequence[MetricsDoc] = (),
    samples: Sequence[Sample] = (),
    class_names: Sequence[str] = (),
    provenance: dict[str, Any] | None = None,
    title: str = "xrayfm report",
) -> str:
    """The whole report as one HTML string."""
    body: dict[str, str] = {}
    body["figure2"] = "".join(
        _img(figures.prediction_figure(s.image, s.result, s.name), f"prediction {s.name}") for s in samples
    ) or _missing("no sample images (pass --model and --images)")
    body["results"] = results_table(metrics) if metrics else _missing("no metrics (pass --metrics)")
    eff = label_efficiency_series(metrics)
    body["label-efficiency"] = "".join(
        _img(figures.curves_figure(series, "label fraction", t, t, logx=True), t) for t, series in eff.items()
    ) or _missing("needs metrics of one label at two or more label fractions")
    cms = [
        (m.label, m.doc["classification"]["confusion_matrix"])
        for m in _main_docs(metrics)
        if (m.doc.get("classification") or {}).get("confusion_matrix")
    ]
    body["confusion"] = "".join(
        _img(figures.confusion_figure(cm, class_names, label), f"confusion {label}") for label, cm in cms
    ) or _missing("no classification metrics with a confusion matrix")
    losses = {r.name: (r.steps, r.losses) for r in runs if r.steps}
    body["pretraining"] = (
        _img(figures.curves_figure(losses, "step", "loss", "pretraining loss"), "loss curves")
        if losses
        else _missing("no pretrain runs (pass --runs)")
    )
    body["attention"] = "".join(
        _img(figures.attention_figure(_fit(s.image, s.attention), s.attention, s.name), f"attention {s.name}")
        for s in samples
        if s.attention is not None
    ) or _missing("needs a ViT model bundle and --images")
    emb = [s for s in samples if "embedding" in s.result]
    if len(emb) >= 2:
        pts = pca_2d(np.asarray([s.result["embedding"] for s in emb]))
        regions = [s.result["top3"][0]["region"] if "top3" in s.result else "unknown" for s in emb]
        body["embedding"] = _img(
            figures.embedding_figure(pts, regions, "pooled embeddings, coloured by predicted region"),
            "embedding map",
        )
    else:
        body["embedding"] = _missing("needs two or more sample images")
    prov = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(provenance or {})}
    body["provenance"] = _provenance(runs, metrics, prov)
    toc = "".join(f'<li><a href="#{sid}">{_e(t)}</a></li>' for sid, t in SECTIONS)
    sections = "".join(f'<section id="{sid}"><h2>{_e(t)}</h2>{body[sid]}</section>' for sid, t in SECTIONS)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1><ul>{toc}</ul>{sections}</body></html>"
    )


def _fit(image: np.ndarray, maps: np.ndarray | None) -> np.ndarray:
    """The image resized to a whole number of attention cells, for a pixel-true overlay."""
    import cv2

    if maps is None:
        return image
    h, w = maps.shape[1:]
    scale = max(1, 256 // max(h, w))
    return np.clip(cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_AREA), 0, 1)
