"""What do a backbone's pooled features encode? Region against image statistics, on a synth lake.

    .venv/bin/python benchmarks/feature_content.py --lake LAKE --labels SYNTH_RUN \
        random:vit_tiny_patch16 dino_vit=RUN_DIR [--size 64] [--out benchmarks/results/feature_content.json]

For each backbone (``[NAME=]random:ARCH`` or ``[NAME=]RUN_DIR``, see ``common.backbone_from_spec``) the
pooled features of the lake's train split (bank) and val split (queries) are probed for body region
(class-balanced weighted kNN, k 20, T 0.07, and a linear probe) and for nuisance attributes that
two crops of one image share whatever the region: the image's mean intensity, its standard
deviation and skewness, and from the synth labels the acquisition (log dose, field of view, image
intensifier or flat panel). Reported per backbone: kNN R^2 / balanced accuracy of each attribute,
the share of feature variance in the top 5 principal components of the bank, and the correlation of
the top 3 components with each attribute. A backbone whose first component carries most of the
variance and follows mean intensity has cosine neighbourhoods ruled by brightness, not anatomy.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import backbone_from_spec, balanced_region_accuracy, bank_and_query, linear_probe_scores

from xrayfm.config import atomic_write_text, versions
from xrayfm.synth.regions import REGIONS
from xrayfm.tasks.classify import knn_scores
from xrayfm.tasks.data import LabeledImage
from xrayfm.tasks.evaluate import pooled_features

RESULTS = Path(__file__).resolve().parent / "results" / "feature_content.json"


def attributes(items: list[LabeledImage]) -> dict[str, np.ndarray]:
    """Per-image nuisance attributes: intensity statistics and the synth acquisition parameters."""
    img = np.stack([it.image.reshape(-1) for it in items]).astype(np.float64)
    mean, std = img.mean(1), img.std(1) + 1e-8
    views = [it.extra.get("view", {}) for it in items]
    out = {"mean_intensity": mean, "std_intensity": std,
           "skewness": (((img - mean[:, None]) / std[:, None]) ** 3).mean(1)}
    if all("dose" in v for v in views):
        out |= {"log_dose": np.log([v["dose"] for v in views]),
                "field_mm": np.array([v["field_mm"] for v in views], dtype=np.float64),
                "image_intensifier": np.array([float(v["circular"]) for v in views])}
    return out


def knn_r2(fb: torch.Tensor, fq: torch.Tensor, yb: np.ndarray, yq: np.ndarray, k: int = 20) -> float:
    """R^2 of a cosine-weighted kNN regression (k neighbours, temperature 0.07)."""
    sim, idx = (F.normalize(fq, dim=1) @ F.normalize(fb, dim=1).T).topk(k, dim=1)
    w = (sim / 0.07).exp().numpy()
    pred = (w * yb[idx.numpy()]).sum(1) / w.sum(1)
    return float(1 - ((yq - pred) ** 2).sum() / ((yq - yq.mean()) ** 2).sum())


def probe(backbone: torch.nn.Module, bank: list[LabeledImage], query: list[LabeledImage], size: int) -> dict:
    fb, fq = pooled_features(backbone, bank, size), pooled_features(backbone, query, size)
    yb = np.array([it.region_index for it in bank])
    yq = np.array([it.region_index for it in query])
    ab, aq = attributes(bank), attributes(query)
    centred = (fb - fb.mean(0)).double().numpy()
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / (s**2).sum()
    return {
        "region_knn": round(balanced_region_accuracy(yq, knn_scores(fb, torch.from_numpy(yb), fq,
                                                                    len(REGIONS)).numpy()), 4),
        "region_linear": round(balanced_region_accuracy(yq, linear_probe_scores(fb.numpy(), yb, fq.numpy())), 4),
        "attribute_knn_r2": {n: round(knn_r2(fb, fq, ab[n], aq[n]), 3) for n in ab},
        "pc_variance_share": [round(float(v), 3) for v in var[:5]],
        "pc_correlation": {f"pc{k + 1}": {n: round(float(np.corrcoef(u[:, k], a)[0, 1]), 2) for n, a in ab.items()}
                           for k in range(3)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backbones", nargs="+", help="[NAME=]random:ARCH or [NAME=]RUN_DIR")
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    bank, query = bank_and_query(args.lake, args.labels)
    result = {"lake": args.lake, "size": args.size, "n_bank": len(bank), "n_query": len(query),
              "versions": versions(), "backbones": {}}
    for spec in args.backbones:
        name, backbone = backbone_from_spec(spec)
        row = probe(backbone.eval(), bank, query, args.size)
        result["backbones"][name] = row
        print(name, json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
