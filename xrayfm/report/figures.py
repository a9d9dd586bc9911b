"""Report figures as PNG bytes (matplotlib, Agg backend): each takes plain arrays and dicts."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xrayfm.report.overlay import draw_overlay


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def prediction_figure(image: np.ndarray, result: dict[str, Any], title: str = "") -> bytes:
    """Figure-2 panel: the image, the overlay (metal tint, screw boxes, head/tip) and top-3 bars."""
    plt = _plt()
    fig, axes = plt.subplots(
        1, 3, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1, 0.8], "wspace": 0.5}
    )
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(title or "image")
    axes[1].imshow(draw_overlay(image, result))
    n_screws = len(result.get("screws") or [])
    axes[1].set_title(f"metal mask + {n_screws} screw(s)")
    for ax in axes[:2]:
        ax.axis("off")
    top = result.get("top3") or []
    if top:
        axes[2].barh([t["region"] for t in top][::-1], [t["probability"] for t in top][::-1], color="#3a7")
        axes[2].set_xlim(0, 1)
        axes[2].set_title("top-3 regions")
    else:
        axes[2].axis("off")
    return _png(fig)


def curves_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> bytes:
    """One line per label: ``series[label] = (x, y)``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def confusion_figure(cm: Sequence[Sequence[float]], class_names: Sequence[str], title: str) -> bytes:
    """Row-normalised confusion matrix (rows = truth) with counts written in the cells."""
    plt = _plt()
    m = np.asarray(cm, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(m)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 0.8 + 0.5 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = list(class_names)[:k] + [str(i) for i in range(len(class_names), k)]
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    int(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)


def attention_figure(image: np.ndarray, maps: np.ndarray, title: str = "") -> bytes:
    """The image and one CLS-attention map per head ``maps (heads, h, w)``, upsampled and overlaid."""
    import cv2

    plt = _plt()
    n = maps.shape[0] + 1
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.1))
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(title or "image", fontsize=8)
    for i, a in enumerate(maps):
        up = cv2.resize(a.astype(np.float32), image.shape[::-1], interpolation=cv2.INTER_NEAREST)
        axes[i + 1].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[i + 1].imshow(up / max(float(up.max()), 1e-12), cmap="inferno", alpha=0.6)
        axes[i + 1].set_title(f"head {i}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    return _png(fig)


def embedding_figure(points: np.ndarray, labels: Sequence[str], title: str) -> bytes:
    """2-D scatter of ``points (N, 2)`` coloured by ``labels``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in sorted(set(labels)):
        sel = np.asarray([lab == name for lab in labels])
        ax.scatter(points[sel, 0], points[sel, 1], s=18, label=name)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)
