"""Model bundle: one folder holding everything predict and serve need, loaded by one path.

Layout::

    BUNDLE/
      bundle.json             format, input size, class names, thresholds, the heads present
      backbone.safetensors    backbone weights (timm key names, one input channel)
      model_card.json         the backbone's card (xrayfm.models.card), intensity convention
      heads/<task>/head.json, heads/<task>/head.safetensors   for task in classify/segment/detect

Any subset of the three heads may be present. All heads must have been trained at the same
input size on the same backbone weights (checked against the card's ``weights_sha256``), so one
backbone pass per batch serves every head: the pooled embedding and the dense maps come from the
same forward call.

Images are resized to ``input_size`` x ``input_size`` (aspect not kept, as in training,
:func:`xrayfm.tasks.data.resize_item`); masks and screw coordinates are mapped back to each
original image here, once, so callers only ever see original-image pixels
(:mod:`xrayfm.conventions`: ``(x, y)`` points, ``(x0, y0, x1, y1)`` boxes, pixel centres at +0.5).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xrayfm.config import atomic_write_bytes, atomic_write_text
from xrayfm.conventions import check_image
from xrayfm.models.backbones import Backbone, ResNetBackbone, ViTBackbone, pool_levels
from xrayfm.models.card import CARD_NAME, WEIGHTS_NAME, load_backbone
from xrayfm.models.heads import head_pool, head_reads_image
from xrayfm.models.runtime import autocast
from xrayfm.tasks.tta import tta_elements, tta_mean

BUNDLE_FORMAT = "xrayfm-model-bundle"
BUNDLE_VERSION = 1
BUNDLE_CARD = "bundle.json"
TASKS = ("classify", "segment", "detect")

Spacing = tuple[float, float] | None  # (row, col) mm, DICOM PixelSpacing order


def joint_features(backbone: Backbone, x: Tensor, dense: bool = True) -> tuple[Tensor, list[Tensor]]:
    """Pooled embedding and (when ``dense``) the dense maps of ``x`` from ONE forward pass.

    Equal to ``backbone(x)`` and ``backbone.forward_dense(x)`` computed separately.
    """
    if not dense:
        return backbone(x), []
    if isinstance(backbone, ViTBackbone):
        xn = backbone.normalise(x)
        backbone._check_size(xn)
        final, maps = backbone.model.forward_intermediates(
            xn, indices=backbone.dense_indices, norm=True, output_fmt="NCHW"
        )
        return final[:, 0], list(maps)
    if isinstance(backbone, ResNetBackbone):
        final, maps = backbone.model.forward_intermediates(backbone.normalise(x), indices=[1, 2, 3, 4])
        return backbone.model.forward_head(final), list(maps)
    return backbone(x), list(backbone.forward_dense(x))


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from xrayfm.tasks.data import LabeledImage, resize_item

    return resize_item(LabeledImage(image=img, image_id=""), size).image


def _class_names(card: dict[str, Any]) -> list[str]:
    n = int(card.get("head_kwargs", {}).get("num_classes", 0))
    if card.get("class_names"):
        return [str(c) for c in card["class_names"]]
    from xrayfm.synth.regions import REGIONS

    return list(REGIONS) if n == len(REGIONS) else [f"class_{i}" for i in range(n)]


def screw_mm(screw: dict[str, Any], spacing: Spacing) -> dict[str, Any]:
    """Add ``head_mm``, ``tip_mm`` and ``length_mm`` to a screw (pixels) given (row, col) spacing."""
    if spacing is None:
        return screw
    row, col = float(spacing[0]), float(spacing[1])
    hx, hy = screw["head"]
    tx, ty = screw["tip"]
    return screw | {
        "head_mm": [hx * col, hy * row],
        "tip_mm": [tx * col, ty * row],
        "length_mm": float(np.hypot((tx - hx) * col, (ty - hy) * row)),
    }


def _operating_value(given: float | None, head: tuple[Path, dict[str, Any]] | None, task: str,
                     key: str = "threshold") -> float:
    """``given``, else the head's ``key`` of the operating point as ``evaluate`` uses it (its tuned
    one or the task's default), else the task's default."""
    from xrayfm.tasks.base import get_task
    from xrayfm.tasks.train import task_for_head

    if given is not None:
        return float(given)
    return float((task_for_head(head[1]) if head is not None else get_task(task)).operating_point()[key])


@dataclass
class ModelBundle:
    """A backbone and its heads, ready to predict on original-size images."""

    path: Path
    backbone: Backbone
    backbone_card: dict[str, Any]
    heads: dict[str, nn.Module]
    head_cards: dict[str, dict[str, Any]]
    input_size: int
    class_names: list[str]
    options: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "fp32"  # what the forward pass runs in: fp32 or bf16 (autocast)
    tta: str = "none"  # test-time augmentation (xrayfm.tasks.tta): none, flip or dihedral

    # ------------------------------------------------------------------ create / load
    @staticmethod
    def create(
        backbone_path: str | Path,
        head_paths: Sequence[str | Path],
        out: str | Path,
        detect_threshold: float | None = None,
        mask_threshold: float | None = None,
        mask_min_area: float | None = None,
    ) -> Path:
        """Assemble a bundle folder from an exported backbone and head bundles; return its path.

        A threshold (or the metal mask's smallest kept component, a fraction of the image area)
        left at None is the head's tuned operating point (``head.json`` ``operating_point``,
        chosen on the val split by ``heads train``), else 0.3 / 0.5 (and no component filter).
        """
        from xrayfm.tasks.train import HEAD_CARD, HEAD_WEIGHTS, load_head_bundle

        for name, value in (("detect_threshold", detect_threshold), ("mask_threshold", mask_threshold)):
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        if mask_min_area is not None and not 0.0 <= mask_min_area < 1.0:
            raise ValueError(f"mask_min_area is a fraction of the image area in [0, 1), got {mask_min_area}")
        _, bb_card = load_backbone(str(backbone_path))
        if not head_paths:
            raise ValueError(
                "no heads given; pass at least one head bundle folder (classify, segment or detect)"
            )
        heads: dict[str, tuple[Path, dict[str, Any]]] = {}
        for hp in head_paths:
            _, card = load_head_bundle(hp)
            task = card.get("task")
            if task not in TASKS:
                raise ValueError(f"head {hp}: task {task!r} is not one of {', '.join(TASKS)}")
            if task in heads:
                raise ValueError(
                    f"two {task} heads given ({heads[task][0]} and {hp}); pass one head per task"
                )
            want, got = bb_card.get("weights_sha256"), (card.get("backbone") or {}).get("weights_sha256")
            if card.get("fine_tuned_backbone"):
                raise ValueError(
                    f"head {hp} was trained with a fine-tuned backbone; pass --backbone "
                    f"{Path(hp) / card['fine_tuned_backbone']} and heads trained on it"
                )
            if want and got and want != got:
                raise ValueError(
                    f"head {hp} was trained on other backbone weights ({got[:12]}, not {want[:12]}); "
                    "pass the backbone the head was trained on"
                )
            heads[task] = (Path(hp), card)
        sizes = {int(c["img_size"]) for _, c in heads.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"heads were trained at different input sizes {sorted(sizes)}; one backbone pass "
                "needs one size: retrain the heads at the same img_size"
            )
        out_dir = Path(out)
        src = Path(backbone_path)
        src = src.parent if src.is_file() else src
        for name in (WEIGHTS_NAME, CARD_NAME):
            atomic_write_bytes(out_dir / name, (src / name).read_bytes())
        for task, (hp, _) in heads.items():
            for name in (HEAD_CARD, HEAD_WEIGHTS):
                atomic_write_bytes(out_dir / "heads" / task / name, (hp / name).read_bytes())
        for stale in set(TASKS) - set(heads):  # re-using an output folder must not keep old heads
            shutil.rmtree(out_dir / "heads" / stale, ignore_errors=True)
        card = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "arch": bb_card["arch"],
            "input_size": sizes.pop(),
            "intensity_convention": bb_card.get("intensity_convention"),
            "class_names": _class_names(heads["classify"][1]) if "classify" in heads else None,
            "heads": {t: {"head": c["head"], "dir": f"heads/{t}"} for t, (_, c) in heads.items()},
            "options": {
                "detect_threshold": _operating_value(detect_threshold, heads.get("detect"), "detect"),
                "mask_threshold": _operating_value(mask_threshold, heads.get("segment"), "segment"),
                "mask_min_area": _operating_value(mask_min_area, heads.get("segment"), "segment", "min_area"),
            },
            "backbone_weights_sha256": bb_card.get("weights_sha256"),
        }
        atomic_write_text(out_dir / BUNDLE_CARD, json.dumps(card, indent=2))
        return out_dir

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", precision: str = "fp32", tta: str = "none") -> ModelBundle:
        """Load a bundle folder written by :meth:`create` in eval mode on ``device`` ("cpu", "cuda",
        "auto"); ``precision`` "bf16" (or "auto": bf16 where it is fast) runs the forward pass
        under bf16 autocast, fp32 (the default) exactly as evaluated; ``tta`` averages every head
        over mirrored (``flip``) or all 8 rotated/mirrored (``dihedral``) copies of each image."""
        from xrayfm.models.runtime import resolve_bf16, resolve_device
        from xrayfm.tasks.train import load_head_bundle

        tta_elements(tta)  # an unknown mode fails here, before the weights load
        dev = resolve_device(device)
        amp = resolve_bf16(precision, dev)

        p = Path(path)
        card_path = p / BUNDLE_CARD
        if not card_path.is_file():
            raise FileNotFoundError(
                f"{p} is not a model bundle (no {BUNDLE_CARD}); build one with `xrayfm bundle`"
            )
        card = json.loads(card_path.read_text())
        if card.get("format") != BUNDLE_FORMAT or int(card.get("version", 0)) > BUNDLE_VERSION:
            raise ValueError(
                f"{card_path} is not a version <= {BUNDLE_VERSION} {BUNDLE_FORMAT}; rebuild the bundle"
            )
        backbone, bb_card = load_backbone(str(p))
        heads, head_cards = {}, {}
        for task, info in card["heads"].items():
            heads[task], head_cards[task] = load_head_bundle(p / info["dir"])
        return cls(
            p,
            backbone.eval().to(dev),
            bb_card,
            {t: h.to(dev) for t, h in heads.items()},
            head_cards,
            int(card["input_size"]),
            list(card.get("class_names") or []),
            dict(card.get("options") or {}),
            str(dev),
            "bf16" if amp else "fp32",
            tta,
        )

    # ------------------------------------------------------------------ inference
    def card(self) -> dict[str, Any]:
        """What a client needs to know about the model (JSON-serialisable)."""
        return {
            "arch": self.backbone_card.get("arch"),
            "input_size": self.input_size,
            "heads": {t: self.head_cards[t]["head"] for t in self.heads},
            "class_names": self.class_names,
            "options": self.options,
            "device": self.device,
            "precision": self.precision,
            "tta": self.tta,
            "intensity_convention": self.backbone_card.get("intensity_convention"),
            "backbone": {k: v for k, v in self.backbone_card.items() if k not in ("versions",)},
        }

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[np.ndarray],
        pixel_spacing: Sequence[Spacing] | None = None,
        return_embedding: bool = False,
    ) -> list[dict[str, Any]]:
        """Run every head on ``images`` (float32 (H, W) in [0, 1]) with one backbone pass.

        Per image: ``height``, ``width``; ``top3`` and ``probabilities`` (classify);
        ``metal_probability`` (float32 (H, W)) and ``metal_mask`` (bool (H, W)) (segment);
        ``screws`` (detect: box, confidence, head, tip, angle_deg, length_px, plus *_mm when the
        image's (row, col) spacing is known); ``embedding`` (list of floats) when asked.
        """
        if not len(images):
            return []
        spacings = list(pixel_spacing) if pixel_spacing is not None else [None] * len(images)
        if len(spacings) != len(images):
            raise ValueError(
                f"got {len(spacings)} pixel spacings for {len(images)} images; pass one per image"
            )
        s = self.input_size
        x = torch.from_numpy(
            np.stack([_resize(check_image(im, f"image {i}"), s) for i, im in enumerate(images)])
        )[:, None].to(self.device)
        results = [{"height": int(im.shape[0]), "width": int(im.shape[1])} for im in images]
        with autocast(x.device, torch.bfloat16 if self.precision == "bf16" else None):
            pooled, outs = self._forward(x)
            if self.tta != "none":  # the embedding stays the plain image's
                vectors = {t: getattr(h, "vector_channels", ()) for t, h in self.heads.items()}
                outs = tta_mean(lambda v: self._forward(v)[1], x, tta_elements(self.tta), vectors, at_identity=outs)
        if "classify" in outs:
            self._classify(outs["classify"], results)
        if "segment" in outs:
            self._segment(outs["segment"], images, results)
        if "detect" in outs:
            self._detect(outs["detect"], spacings, results)
        if return_embedding:
            for r, e in zip(results, pooled.cpu().numpy()):
                r["embedding"] = e.tolist()
        return results

    def _forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One backbone pass over ``x`` and every head: the pooled embedding and each task's raw
        output (class logits, mask logits at the input size, keypoint maps), all float32."""
        s = self.input_size
        cls_pool = head_pool(self.heads["classify"]) if "classify" in self.heads else "final"
        need_dense = any(t in self.heads for t in ("segment", "detect")) or cls_pool == "multilevel"
        pooled, dense = joint_features(self.backbone, x, dense=need_dense)
        outs: dict[str, Tensor] = {}
        if "classify" in self.heads:
            outs["classify"] = self.heads["classify"](pool_levels(dense) if cls_pool == "multilevel" else pooled)
        # heads with image_skip read the normalised input after the maps; normalise it once for all
        reads_image = {t: head_reads_image(h) for t, h in self.heads.items() if t in ("segment", "detect")}
        with_image = dense + [self.backbone.normalise(x)] if any(reads_image.values()) else dense
        if "segment" in self.heads:
            outs["segment"] = self.heads["segment"](with_image if reads_image["segment"] else dense, size=(s, s))
        if "detect" in self.heads:
            outs["detect"] = self.heads["detect"](with_image if reads_image["detect"] else dense)
        return pooled.float(), {t: o.float() for t, o in outs.items()}

    def _classify(self, logits: Tensor, results: list[dict[str, Any]]) -> None:
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        names = self.class_names or [f"class_{i}" for i in range(probs.shape[1])]
        for r, p in zip(results, probs):
            order = np.argsort(-p)[:3]
            r["top3"] = [{"index": int(i), "region": names[i], "probability": float(p[i])} for i in order]
            r["probabilities"] = {n: float(v) for n, v in zip(names, p)}

    def _segment(self, logits: Tensor, images: Sequence[np.ndarray], results: list[dict[str, Any]]) -> None:
        from xrayfm.tasks.segment import binary_mask, probability_maps

        thr = float(self.options.get("mask_threshold", 0.5))
        min_area = float(self.options.get("mask_min_area", 0.0))  # bundles from before the filter: none
        for r, prob in zip(results, probability_maps(logits, [im.shape for im in images])):
            r["metal_probability"] = prob
            r["metal_mask"] = binary_mask(prob, thr, min_area)

    def _detect(self, out: Tensor, spacings: list[Spacing], results: list[dict[str, Any]]) -> None:
        from xrayfm.tasks.detect import screws_in_frames

        s = self.input_size
        frames = [(r["height"], r["width"]) for r in results]
        decoded = screws_in_frames(out, float(self.options.get("detect_threshold", 0.3)), (s, s), frames)
        for r, screws, spacing in zip(results, decoded, spacings):
            for sc in screws:
                sc["confidence"] = sc.pop("score")
            r["screws"] = [screw_mm(sc, spacing) for sc in screws]
