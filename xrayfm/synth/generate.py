"""A synth run: CT -> fake patients, each a study of C-arm series -> DICOM files + labels.parquet.

Every image depends only on (seed, patient index, image index) and the CT, so the same seed
gives identical pixels whatever the number of workers, and an interrupted run resumes by
skipping images whose DICOM and label part already exist.
"""

from __future__ import annotations

import base64
import json
import math
import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xrayfm.config import atomic_write_text
from xrayfm.conventions import pixel_hash, to_uint16
from xrayfm.io.volume import CTVolume, load_volume
from xrayfm.synth.anatomy import Vertebra, find_vertebrae, group_points
from xrayfm.synth.construct import anterior_plate, kwire, spinal_construct
from xrayfm.synth.dicom import fake_patient, write_dicom, xa_dataset
from xrayfm.synth.geometry import View, projection_matrix
from xrayfm.synth.labels import SynthLabel, decode_mask, encode_mask, write_labels
from xrayfm.synth.regions import REGIONS, region_index
from xrayfm.synth.render import PreparedVolume, prepare_volume
from xrayfm.synth.scene import Scene, region_changes, render_scene, vertebra_volume, view_region
from xrayfm.synth.views import plausible_view, random_exposure


@dataclass
class SynthConfig:
    """Resolved settings of one synth run (written to OUT/config.yaml)."""

    out: str
    ct: str = "demo"                       # "demo" or a NIfTI / DICOM-series / .npy path
    labels: str | None = None              # label map for a user CT (NIfTI, same grid)
    region: str | None = None              # region of views the rules cannot name (required without labels)
    n: int = 16
    size: int = 256
    seed: int = 0
    screws: tuple[int, int] = (0, 4)       # pedicle screws per study, inclusive range
    images_per_study: int = 8
    series_per_study: int = 2
    voxel_mm: float = 1.0                  # rendering voxel size (block-mean downsampling)
    kwire_prob: float = 0.15
    plate_prob: float = 0.1
    balance_regions: bool = True           # draw the region first (uniform over those the CT shows)
    region_margin_px: float = 0.0          # redraw views whose region a move of this many px changes (0: off)
    workers: int = 1
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # raw .npy/.npz only
    hu_offset: float = 0.0                                  # raw .npy/.npz only
    cache: str | None = None               # demo CT cache folder


@dataclass
class SynthSummary:
    n_images: int
    n_written: int
    n_skipped: int
    n_patients: int
    n_screws: int
    regions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Base:
    """What every worker needs: the prepared volume and its anatomy."""

    volume: PreparedVolume
    vertebrae: list[Vertebra]
    group_points: dict[str, np.ndarray]
    default_region: str
    source: str
    regions: tuple[str, ...] = ()          # regions the CT's views show (balanced sampling draws from these)
    vertebra_volume: PreparedVolume | None = None  # vertebra occupancy for the vertebra masks


_BASE: _Base | None = None


def load_ct(cfg: SynthConfig) -> CTVolume:
    """Load the configured CT (and labels); the demo comes from the fetch cache."""
    if cfg.ct == "demo":
        from xrayfm.synth.demo_data import demo_paths

        ct, mask = demo_paths(cfg.cache)
        return load_volume(ct, labels=mask, name="LIDC-IDRI-0001")
    return load_volume(cfg.ct, labels=cfg.labels, spacing=tuple(cfg.spacing), hu_offset=cfg.hu_offset)


def prepare_base(cfg: SynthConfig, vol: CTVolume) -> _Base:
    if vol.labels is None and cfg.region is None:
        raise ValueError(f"{vol.name}: no label map, so the body region cannot be derived; pass --region NAME "
                         "or --labels PATH")
    default = cfg.region or "thorax"
    region_index(default)
    pv = prepare_volume(vol, voxel_mm=cfg.voxel_mm)
    base = _Base(volume=pv, vertebrae=find_vertebrae(vol), group_points=group_points(vol, seed=cfg.seed),
                 default_region=default, source=vol.name, vertebra_volume=vertebra_volume(vol, pv))
    base.regions = shown_regions(base, cfg)
    return base


def shown_regions(base: _Base, cfg: SynthConfig, n_views: int = 200, min_share: float = 0.01) -> tuple[str, ...]:
    """Regions that at least ``min_share`` of unconstrained random views of the CT show (in REGIONS order)."""
    scene = Scene(base.volume, base.group_points, [], base.default_region, base.vertebrae)
    rng = np.random.default_rng([cfg.seed, 3])
    counts: dict[str, int] = {}
    for _ in range(n_views):
        region, _ = view_region(scene, plausible_view(rng, scene.volume, _target(scene, rng), cfg.size))
        counts[region] = counts.get(region, 0) + 1
    return tuple(r for r in REGIONS if counts.get(r, 0) >= min_share * n_views)


def _patient_transform(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    """Per-patient size variation: isotropic scale about the body's centre."""
    s = float(rng.uniform(0.92, 1.08))
    t = np.diag([s, s, s, 1.0])
    t[:3, 3] = center - s * center
    return t


def _move(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ t[:3, :3].T + t[:3, 3]


def build_scene(base: _Base, cfg: SynthConfig, patient: int) -> Scene:
    """The patient's body (scaled CT) and hardware, fixed for all images of the study."""
    rng = np.random.default_rng([cfg.seed, patient, 1])
    center = 0.5 * (base.volume.body_lo + base.volume.body_hi)
    t = _patient_transform(rng, center)
    verts = [Vertebra(v.name, _move(t, v.body_center), _move(t, v.canal_center), v.body_width * t[0, 0],
                      v.body_depth * t[0, 0], v.height * t[0, 0]) for v in base.vertebrae]
    lo, hi = cfg.screws
    # hardware away from the scan's cut ends, so views centred on it need little collimation
    vol = base.volume.transformed(t)
    inner = [v for v in verts if vol.z_lo + 70.0 < v.body_center[2] < vol.z_hi - 70.0] or verts
    implants = spinal_construct(inner, int(rng.integers(lo, hi + 1)), rng) if verts else []
    if verts and rng.random() < cfg.kwire_prob:
        implants.append(kwire(inner[int(rng.integers(len(inner)))], rng))
    if verts and rng.random() < cfg.plate_prob:
        plate = anterior_plate(inner, rng)
        if plate is not None:
            implants.append(plate)
    pts = {g: _move(t, p) for g, p in base.group_points.items()}
    bone = base.vertebra_volume.transformed(t) if base.vertebra_volume is not None else None
    return Scene(volume=vol, group_points=pts, implants=implants,
                 default_region=base.default_region, vertebrae=verts, vertebra_volume=bone)


# Structure groups (xrayfm.synth.anatomy.GROUPS) a view of each region is aimed at.
_REGION_GROUPS = {"head": ("skull",), "cervical_spine": ("cervical",), "thoracic_spine": ("thoracic",),
                  "lumbar_spine": ("lumbar",), "shoulder": ("shoulder",), "thorax": ("lung",),
                  "abdomen": ("abdomen",), "pelvis": ("pelvis_bone", "sacrum"), "hip": ("femur",)}


def _region_view(scene: Scene, rng: np.random.Generator, wanted: str, size: int, margin_px: float = 0.0,
                 tries: int = 30) -> View:
    """A plausible view that shows ``wanted``: aimed at the hardware (half the time, when there is
    some) or at the region's structures, re-drawn until the region rules name ``wanted`` and, with
    ``margin_px``, still do when the C-arm moves that many pixels (the last draw is kept when none does)."""
    metal = [p for imp in scene.implants if imp.kind == "screw" for p in (imp.head, imp.tip)]
    groups = [scene.group_points[g] for g in _REGION_GROUPS.get(wanted, ()) if len(scene.group_points.get(g, ()))]
    view = None
    for _ in range(tries):
        if metal and rng.random() < 0.5:
            target = np.mean(metal, axis=0)
        elif groups:
            pts = groups[int(rng.integers(len(groups)))]
            target = pts[int(rng.integers(len(pts)))]
        else:
            target = _target(scene, rng)
        view = plausible_view(rng, scene.volume, target, size)
        if view_region(scene, view)[0] == wanted and _stable(scene, view, margin_px):
            break
    assert view is not None
    return view


def _stable(scene: Scene, view: View, margin_px: float) -> bool:
    return margin_px <= 0 or not region_changes(scene, view, margin_px)


def _natural_view(scene: Scene, rng: np.random.Generator, size: int, margin_px: float = 0.0,
                  tries: int = 30) -> View:
    """A plausible view aimed by :func:`_target`; with ``margin_px`` re-drawn until its region is
    stable at that margin (the last draw is kept when none is)."""
    for _ in range(tries):
        view = plausible_view(rng, scene.volume, _target(scene, rng), size)
        if _stable(scene, view, margin_px):
            break
    return view


def _target(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Where the C-arm is centred: the hardware (half the time when there is some), a vertebra,
    or a point of a randomly chosen labelled structure group (lung, shoulder, abdomen, ...)."""
    metal = [p for imp in scene.implants if imp.kind == "screw" for p in (imp.head, imp.tip)]
    groups = [p for p in scene.group_points.values() if len(p)]
    u = rng.random()
    if metal and u < 0.5:
        return np.mean(metal, axis=0)
    if scene.vertebrae and (u < 0.75 or not groups):
        return scene.vertebrae[int(rng.integers(len(scene.vertebrae)))].body_center
    if groups:
        g = groups[int(rng.integers(len(groups)))]
        return g[int(rng.integers(len(g)))]
    lo, hi = scene.volume.body_lo, scene.volume.body_hi
    return lo + (hi - lo) * rng.uniform(0.3, 0.7, 3)


def image_paths(out: Path, index: int, cfg: SynthConfig) -> tuple[Path, Path, int, int, int]:
    """(DICOM path, label part path, patient, series number, instance number) of image ``index``."""
    patient, k = divmod(index, cfg.images_per_study)
    per_series = math.ceil(cfg.images_per_study / cfg.series_per_study)
    series, instance = k // per_series + 1, k % per_series + 1
    dcm = out / "dicom" / f"patient_{patient:04d}" / f"series_{series:02d}" / f"img_{instance:03d}.dcm"
    return dcm, out / ".parts" / f"{index:06d}.json", patient, series, instance


def render_image(base: _Base, cfg: SynthConfig, index: int, scene: Scene) -> tuple[np.ndarray, SynthLabel, dict]:
    """Render image ``index`` of the run; returns (uint16 pixels, label, view record)."""
    _, _, patient, series, instance = image_paths(Path(cfg.out), index, cfg)
    rng = np.random.default_rng([cfg.seed, patient, series, instance, 2])
    if cfg.balance_regions and len(base.regions) > 1:
        view = _region_view(scene, rng, base.regions[int(rng.integers(len(base.regions)))], cfg.size,
                            cfg.region_margin_px)
    else:
        view = _natural_view(scene, rng, cfg.size, cfg.region_margin_px)
    exposure = random_exposure(rng)
    r = render_scene(scene, view, exposure, rng)
    pixels = to_uint16(r.image)
    record = {**view.to_json_dict(), "projection_matrix": projection_matrix(view).round(6).tolist(),
              "dose": exposure.dose, "patient": patient, "series": series,
              "instance": instance, "implants": [imp.kind for imp in scene.implants]}
    label = SynthLabel(pixel_hash=pixel_hash(pixels), region=r.region, height=cfg.size, width=cfg.size,
                       pixel_spacing_mm=view.iso_pixel_mm, mask=r.mask, screws=r.screws, view=record,
                       source=base.source, vertebra_mask=r.vertebra_mask)
    return pixels, label, {"view": view, "exposure": exposure}


def _write_image(base: _Base, cfg: SynthConfig, index: int, scene: Scene) -> None:
    out = Path(cfg.out)
    dcm_path, part_path, patient, series, instance = image_paths(out, index, cfg)
    pixels, label, extra = render_image(base, cfg, index, scene)
    ds = xa_dataset(pixels, fake_patient(cfg.seed, patient), extra["view"], extra["exposure"], seed=cfg.seed,
                    patient_index=patient, series_number=series, instance_number=instance, source=base.source)
    write_dicom(dcm_path, ds)
    part = {"pixel_hash": label.pixel_hash, "region": label.region, "height": label.height,
            "width": label.width, "pixel_spacing_mm": label.pixel_spacing_mm,
            "mask_png": base64.b64encode(encode_mask(label.mask)).decode(), "screws": label.screws,
            "view": label.view, "source": label.source,
            "vertebrae_png": None if label.vertebra_mask is None
            else base64.b64encode(encode_mask(label.vertebra_mask)).decode()}
    atomic_write_text(part_path, json.dumps(part))


def _work(args: tuple[SynthConfig, list[int]]) -> list[int]:
    cfg, indices = args
    assert _BASE is not None
    scenes: dict[int, Scene] = {}
    for i in indices:
        patient = i // cfg.images_per_study
        if patient not in scenes:
            scenes = {patient: build_scene(_BASE, cfg, patient)}
        _write_image(_BASE, cfg, i, scenes[patient])
    return indices


def _init_worker(base: _Base) -> None:
    import cv2
    import torch

    global _BASE
    _BASE = base
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def generate(cfg: SynthConfig, progress: Callable[[int], None] | None = None,
             base: _Base | None = None) -> SynthSummary:
    """Run the synth job described by ``cfg``; ``progress(k)`` is called as ``k`` more images finish."""
    import time

    t_start = time.time()
    if cfg.n < 1 or cfg.size < 32 or cfg.size % 32:
        raise ValueError(f"n={cfg.n}, size={cfg.size}: need n >= 1 and size a multiple of 32 (>= 32)")
    if not 0 <= cfg.screws[0] <= cfg.screws[1]:
        raise ValueError(f"screws={cfg.screws}: give a range lo-hi with 0 <= lo <= hi")
    out = Path(cfg.out)
    base = base or prepare_base(cfg, load_ct(cfg))
    todo = [i for i in range(cfg.n) if not all(p.is_file() for p in image_paths(out, i, cfg)[:2])]
    skipped = cfg.n - len(todo)
    if progress and skipped:
        progress(skipped)
    chunks = _patient_chunks(todo, cfg.images_per_study)
    if cfg.workers <= 1 or len(chunks) <= 1:
        _init_worker_main(base)
        for chunk in chunks:
            _work((cfg, chunk))
            if progress:
                progress(len(chunk))
    else:
        ctx = mp.get_context("spawn")  # fork after OpenMP/OpenCV threads started can deadlock
        with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(base,)) as pool:
            for done in pool.imap_unordered(_work, [(cfg, c) for c in chunks]):
                if progress:
                    progress(len(done))
    labels = collect_parts(out, cfg.n)
    write_labels(out / "labels.parquet", labels)
    regions: dict[str, int] = {}
    for lb in labels:
        regions[lb.region] = regions.get(lb.region, 0) + 1
    return SynthSummary(n_images=cfg.n, n_written=len(todo), n_skipped=skipped,
                        n_patients=math.ceil(cfg.n / cfg.images_per_study),
                        n_screws=sum(len(lb.screws) for lb in labels), regions=regions,
                        seconds=time.time() - t_start)


def _init_worker_main(base: _Base) -> None:
    global _BASE
    _BASE = base


def _patient_chunks(indices: list[int], per_study: int) -> list[list[int]]:
    chunks: dict[int, list[int]] = {}
    for i in indices:
        chunks.setdefault(i // per_study, []).append(i)
    return list(chunks.values())


def collect_parts(out: Path, n: int) -> list[SynthLabel]:
    """Read the per-image label parts of images 0..n-1 in order."""
    labels = []
    for i in range(n):
        part = json.loads((out / ".parts" / f"{i:06d}.json").read_text())
        vert = part.get("vertebrae_png")  # parts written before vertebra masks existed have none
        labels.append(SynthLabel(pixel_hash=part["pixel_hash"], region=part["region"], height=part["height"],
                                 width=part["width"], pixel_spacing_mm=part["pixel_spacing_mm"],
                                 mask=decode_mask(base64.b64decode(part["mask_png"])), screws=part["screws"],
                                 view=part["view"], source=part["source"],
                                 vertebra_mask=None if vert is None else decode_mask(base64.b64decode(vert))))
    return labels
