"""Test helpers: the phantom CT as NIfTI files, and a small synth run ingested into a lake."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nibabel as nib
import torch

from xrayfm.lake.ingest import IngestConfig, ingest
from xrayfm.models import create_backbone, export_backbone
from xrayfm.synth.generate import SynthConfig, generate
from xrayfm.synth.phantom import make_phantom


def phantom_ct_files(folder: Path) -> tuple[Path, Path]:
    """The phantom's CT and label map as ``phantom_ct.nii.gz`` / ``phantom_seg.nii.gz`` (with a
    TotalSegmentator-style ``structures.csv``) in ``folder``."""
    vol = make_phantom(voxel_mm=3.0)
    ct, seg = folder / "phantom_ct.nii.gz", folder / "phantom_seg.nii.gz"
    nib.save(nib.Nifti1Image(vol.hu, vol.affine), ct)
    nib.save(nib.Nifti1Image(vol.labels, vol.affine), seg)
    with (folder / "structures.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "original_idx", "structure", "id"])
        w.writerows(["x", lid, name, lid] for lid, name in vol.label_names.items())
    return ct, seg


def heads_world(root: Path) -> Path:
    """A 24-image synth run of the phantom in ``root/synth``, ingested into ``root/lake`` (64 px,
    50/25/25 split under a fixed key) and a random-init resnet18 bundle in ``root/bb``."""
    ct, seg = phantom_ct_files(root)
    generate(SynthConfig(out=str(root / "synth"), ct=str(ct), labels=str(seg), n=24, size=64, seed=3,
                         screws=(2, 4), images_per_study=2, series_per_study=1, voxel_mm=3.0))
    # A fixed key: the patient-level split is a function of the keyed pseudonyms, and the tests
    # need a known split (a random key left only 2 of 24 images in train once).
    (root / "k.key").write_bytes(hashlib.sha256(b"xrayfm test_tasks_cli key 0").digest())
    (root / "k.key").chmod(0o600)
    ingest([str(root / "synth" / "dicom")], str(root / "lake"),
           IngestConfig(key_file=str(root / "k.key"), max_side=64, split_fractions=(0.5, 0.25, 0.25)))
    torch.manual_seed(0)
    export_backbone(create_backbone("resnet18", img_size=64), root / "bb", 64, extra={"method": "random"})
    return root
