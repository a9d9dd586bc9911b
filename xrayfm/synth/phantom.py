"""A procedural torso phantom with a label map: used when no CT is at hand (tests, offline demos).

Water-equivalent elliptic body (40 HU) on a CT table (separate, removed by the body mask), two
lungs (-800 HU), a column of lumbar-sized vertebrae (body 1000 HU shell / 250 HU core,
pedicles and a spinous process) around a spinal canal with a cord, and labels named as
TotalSegmentator names them. RAS world frame, patient supine, 2 mm voxels by default.
"""

from __future__ import annotations

import numpy as np

from xrayfm.io.volume import CTVolume

_NAMES = {1: "lung_upper_lobe_left", 2: "lung_upper_lobe_right", 3: "spinal_cord"}
_LEVELS = ["L3", "L2", "L1", "T12", "T11", "T10"]  # caudal to cranial (z up)


def make_phantom(voxel_mm: float = 2.0, length_mm: float = 240.0) -> CTVolume:
    """Build the phantom; vertebrae every 40 mm along z, ids 10.. named ``vertebrae_<level>``."""
    nx, ny, nz = int(320 / voxel_mm), int(260 / voxel_mm), int(length_mm / voxel_mm)
    c = (np.arange(nx) + 0.5) * voxel_mm - 160.0, (np.arange(ny) + 0.5) * voxel_mm - 130.0, \
        (np.arange(nz) + 0.5) * voxel_mm - length_mm / 2
    x, y, z = np.meshgrid(*c, indexing="ij")
    hu = np.full((nx, ny, nz), -1000.0, dtype=np.float32)
    lab = np.zeros((nx, ny, nz), dtype=np.int16)
    body = (x / 150.0) ** 2 + ((y - 10.0) / 100.0) ** 2 <= 1.0
    hu[body] = 40.0
    hu[(np.abs(y + 110.0) < 6.0) & (np.abs(x) < 140.0)] = 300.0  # table slab below the back, not touching
    for side, lid in ((1.0, 2), (-1.0, 1)):
        lung = ((x - side * 70.0) / 50.0) ** 2 + ((y - 15.0) / 60.0) ** 2 + ((z - length_mm / 4) / 90.0) ** 2 <= 1.0
        hu[lung & body] = -800.0
        lab[lung & body] = lid
    yc = -35.0  # canal centre (posterior of the body centre)
    canal = x ** 2 + (y - yc) ** 2 <= 9.0 ** 2
    for k, level in enumerate(_LEVELS):
        zc = -length_mm / 2 + 20.0 + 40.0 * k
        slab = np.abs(z - zc) <= 14.0
        vb = (x / 22.0) ** 2 + ((y - yc - 30.0) / 17.0) ** 2 <= 1.0
        core = (x / 18.0) ** 2 + ((y - yc - 30.0) / 13.0) ** 2 <= 1.0
        ped = (np.abs(np.abs(x) - 13.0) <= 4.5) & (y > yc - 10.0) & (y < yc + 16.0)
        lamina = ((x ** 2 + (y - yc) ** 2) <= 16.0 ** 2) & (y < yc) & ~canal
        spinous = (np.abs(x) <= 3.0) & (y < yc - 10.0) & (y > yc - 45.0)
        bone = slab & (vb | ped | lamina | spinous)
        hu[bone] = 1000.0
        hu[slab & core] = 250.0
        lab[bone] = 10 + k
    cord = canal & (np.abs(z) < length_mm / 2)
    hu[cord] = 30.0
    lab[cord] = 3
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = [c[0][0], c[1][0], c[2][0]]
    names = {**_NAMES, **{10 + k: f"vertebrae_{lv}" for k, lv in enumerate(_LEVELS)}}
    return CTVolume(hu=hu, affine=affine, name="phantom", labels=lab, label_names=names)
