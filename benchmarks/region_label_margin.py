"""How well-posed the synthetic body-region label is: the share of views whose region changes when
the C-arm moves by a pixel or a few.

A synth view's region is named by written rules on coverage thresholds (``xrayfm.synth.regions``),
so a view near a threshold carries a label that a barely visible move flips: such views bound the
accuracy any classifier can reach from the pixels. For every image of a synth run this rebuilds the
patient's scene, checks that the stored view still gives the stored region, then shifts the
isocentre by D image pixels (at the isocentre plane) in K directions within the detector plane and
counts the views whose region changes in at least one of them. With ``--lake`` the same is also
reported for the lake's test split (the images the heads are scored on), per class and per flip.

    .venv/bin/python benchmarks/region_label_margin.py --synth SYNTH_RUN [--lake LAKE] \
        [--shifts-px 1,2,4,8] [--directions 8] [--out benchmarks/results/region_label_margin.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from xrayfm.config import atomic_write_text, load_yaml, versions
from xrayfm.lake.catalog import query
from xrayfm.synth.generate import SynthConfig, build_scene, load_ct, prepare_base
from xrayfm.synth.geometry import View
from xrayfm.synth.labels import read_labels
from xrayfm.synth.scene import region_changes, view_region

RESULTS = Path(__file__).resolve().parent / "results" / "region_label_margin.json"


def _summary(rows: list[dict], shifts: list[float]) -> dict:
    out: dict = {"n": len(rows)}
    per_class = Counter(r["region"] for r in rows)
    for d in shifts:
        flipped = [r for r in rows if r["flips"][str(d)]]
        flipped_class = Counter(r["region"] for r in flipped)
        pairs = Counter(f"{r['region']} -> {t}" for r in flipped for t in r["flips"][str(d)])
        out[f"shift_{d:g}px"] = {
            "changed_share": round(len(flipped) / max(len(rows), 1), 4),
            "changed_per_class": {c: round(flipped_class[c] / n, 4) for c, n in sorted(per_class.items())},
            "changed_to": dict(pairs.most_common(10)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synth", required=True, help="a finished synth run (config.yaml, labels.parquet)")
    ap.add_argument("--lake", help="also report the lake's test split (joined on the pixel hash)")
    ap.add_argument("--shifts-px", default="1,2,4,8")
    ap.add_argument("--directions", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    run = Path(args.synth)
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{run}: no config.yaml; pass the OUT folder of a finished `xrayfm synth` run")
    cfg = load_yaml(SynthConfig, run / "config.yaml")
    shifts = [float(s) for s in args.shifts_px.split(",")]
    t0 = time.time()
    base = prepare_base(cfg, load_ct(cfg))
    labels = read_labels(run / "labels.parquet")
    rows, mismatched, patient, scene = [], 0, None, None
    for lab in labels:
        if lab.view["patient"] != patient:  # labels come patient by patient: one scene at a time
            patient = lab.view["patient"]
            scene = build_scene(base, cfg, int(patient))
        view = View.from_json_dict(lab.view)
        if view_region(scene, view)[0] != lab.region:
            mismatched += 1
            continue
        flips = {str(d): sorted(region_changes(scene, view, d, args.directions)) for d in shifts}
        rows.append({"pixel_hash": lab.pixel_hash, "region": lab.region, "flips": flips})
    if mismatched:
        print(f"warning: {mismatched} stored views no longer give their stored region (left out)")
    result = {"synth": str(run), "size": cfg.size, "directions": args.directions, "shifts_px": shifts,
              "mismatched": mismatched, "all": _summary(rows, shifts)}
    if args.lake:
        test = set(query(args.lake, "SELECT source_pixel_hash FROM images WHERE split = 'test'")
                   .column(0).to_pylist())
        result["lake"] = args.lake
        result["test"] = _summary([r for r in rows if r["pixel_hash"] in test], shifts)
    result.update(seconds=round(time.time() - t0, 1), versions=versions())
    for part in ("all", "test"):
        if part in result:
            shares = ", ".join(f"{d:g} px {result[part][f'shift_{d:g}px']['changed_share']:.1%}" for d in shifts)
            print(f"{part} ({result[part]['n']} views): region changes within a shift of {shares}")
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
