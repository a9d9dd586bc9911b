"""What the report is made from: pretrain run folders, ``xrayfm evaluate`` metrics, sample images.

* Pretrain run folder: ``metrics.jsonl`` (one JSON record per logged step, with ``step`` and
  ``loss``), ``model_card.json``, ``config.yaml``, ``run.json``.
* Metrics file: the document ``xrayfm evaluate`` writes (sections ``classification``,
  ``segmentation``, ``detection``, ``backbone``, ``heads``). Its label is given as
  ``LABEL=PATH`` or defaults to ``arch (method)``; the label fraction the heads were trained with
  is read from the head bundles the document names (``head.json`` ``train_config``), so several
  files of one label at different fractions make a label-efficiency curve.
* Sample images: any files ``xrayfm predict`` reads, run through a model bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RunInfo:
    """One pretraining run."""

    name: str
    steps: list[float]
    losses: list[float]
    card: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    run: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetricsDoc:
    """One evaluation document and how to label it."""

    label: str
    doc: dict[str, Any]
    label_fraction: float | None = None
    source: str = ""


@dataclass
class Sample:
    """One sample image with its prediction (``ModelBundle.predict`` result)."""

    name: str
    image: np.ndarray
    result: dict[str, Any]
    attention: np.ndarray | None = None  # (heads, h, w) CLS attention of the last ViT block


def load_run(path: str | Path) -> RunInfo:
    """Read a pretrain run folder (needs ``metrics.jsonl``; the other files are optional)."""
    p = Path(path)
    log = p / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(
            f"{p} has no metrics.jsonl; pass a pretrain run folder (xrayfm pretrain --out)"
        )
    records = []
    for n, line in enumerate(log.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{log} line {n} is not JSON ({exc.msg}); fix or remove the line") from exc
    rec = [r for r in records if "step" in r and "loss" in r]

    def read_json(name: str) -> dict[str, Any]:
        f = p / name
        return json.loads(f.read_text()) if f.is_file() else {}

    card = read_json("model_card.json")
    cfg = p / "config.yaml"
    name = f"{p.name}: {card.get('arch', '?')} ({card.get('method', '?')})"
    return RunInfo(
        name,
        [float(r["step"]) for r in rec],
        [float(r["loss"]) for r in rec],
        card,
        cfg.read_text() if cfg.is_file() else "",
        read_json("run.json"),
        rec[-1] if rec else {},
    )


def _label_fraction(doc: dict[str, Any]) -> float | None:
    for hp in (doc.get("heads") or {}).values():
        card = Path(hp) / "head.json"
        if card.is_file():
            frac = json.loads(card.read_text()).get("train_config", {}).get("label_fraction")
            if frac is not None:
                return float(frac)
    return None


def load_metrics(spec: str) -> MetricsDoc:
    """``PATH`` or ``LABEL=PATH`` of an ``xrayfm evaluate`` metrics JSON."""
    label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"metrics file {p} does not exist; pass the JSON `xrayfm evaluate --out` wrote"
        )
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"metrics file {p} is not valid JSON ({exc.msg}); pass an xrayfm evaluate output"
        ) from exc
    if not isinstance(doc, dict) or not {"classification", "segmentation", "detection"} & set(doc):
        raise ValueError(
            f"metrics file {p} has no classification/segmentation/detection section; "
            "pass an xrayfm evaluate output"
        )
    bb = doc.get("backbone") or {}
    label = label or f"{bb.get('arch', p.stem)} ({bb.get('method') or 'unknown init'})"
    return MetricsDoc(label, doc, _label_fraction(doc), str(p))


def predict_samples(
    bundle: Any, paths: list[Path], max_images: int = 6, attention: bool = True,
    attention_backbone: tuple[Any, int] | None = None,
) -> list[Sample]:
    """Predict the first frame of up to ``max_images`` files (with embeddings, and ViT attention).

    Attention comes from ``attention_backbone`` (a ViT and its input size) when given, else from
    the bundle's backbone when that is a ViT.
    """
    from xrayfm.io import FrameSampling, read_any
    from xrayfm.models.backbones import ViTBackbone
    from xrayfm.report.analysis import cls_attention
    from xrayfm.serve.results import frame_spacing
    from xrayfm.tasks.data import LabeledImage, resize_item

    samples: list[Sample] = []
    for path in paths[:max_images]:
        frame = next(iter(read_any(path, FrameSampling(max_frames=1))))
        result = bundle.predict([frame.image], [frame_spacing(frame)], return_embedding=True)[0]
        att = None
        vit, size = attention_backbone or (bundle.backbone, bundle.input_size)
        if attention and isinstance(vit, ViTBackbone):
            small = resize_item(LabeledImage(image=frame.image, image_id=""), size).image
            att = cls_attention(vit, small)
        samples.append(Sample(path.name, frame.image, result, att))
    return samples
