"""The predicted metal mask as a DICOM Segmentation (SEG) object, via highdicom.

One binary segment: category SCT 105590001 "Substance", type SCT 425620007 "Metal", algorithm
type AUTOMATIC, algorithm family DCM 123110 "Artificial Intelligence". The SEG references its
source image and, as the standard requires, copies the source's patient and study modules: it
carries the same identifiers as the input file. Only single-frame sources are supported;
highdicom needs a Frame of Reference to map the frames of a multi-frame source, and X-ray cine
files rarely have one. For projection images (no slice thickness) the Pixel Measures item is
left out; the spacing stays with the referenced source image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

METAL_CODE = ("425620007", "SCT", "Metal")


def derived_object_kwargs(model_name: str, version: str, series_number: int) -> dict[str, object]:
    """Identity of a new DICOM object xrayfm derives from a source image (fresh series/instance UIDs)."""
    import highdicom as hd

    return {"series_instance_uid": hd.UID(), "series_number": series_number, "sop_instance_uid": hd.UID(),
            "instance_number": 1, "manufacturer": "xrayfm", "manufacturer_model_name": model_name[:64],
            "software_versions": version, "device_serial_number": "0"}


def metal_segmentation_bytes(source: str | Path, mask: np.ndarray, model_name: str, version: str) -> bytes:
    """Encoded DICOM SEG of ``mask`` (bool (Rows, Columns)) for the single-frame DICOM ``source``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    ds = pydicom.dcmread(source, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ValueError(
            f"{Path(source).name}: DICOM SEG output supports single-frame sources only "
            f"(this one has {frames} frames)"
        )
    if mask.shape != (int(ds.Rows), int(ds.Columns)):
        raise ValueError(f"mask shape {mask.shape} differs from the source's {ds.Rows}x{ds.Columns}")
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="metal",
        segmented_property_category=codes.SCT.Substance,
        segmented_property_type=Code(*METAL_CODE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=f"xrayfm {model_name}", version=version, family=codes.DCM.ArtificialIntelligence
        ),
    )
    with warnings.catch_warnings():
        # highdicom warns about odd person names and quotes them: no patient data in our logs.
        warnings.simplefilter("ignore", UserWarning)
        seg = hd.seg.Segmentation(
            source_images=[ds],
            pixel_array=mask[None].astype(bool),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            **derived_object_kwargs(model_name, version, series_number=9001),
            content_label="METAL",
            content_description="xrayfm predicted metal mask",
            omit_empty_frames=False,
        )
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "SliceThickness" not in ds and "PixelMeasuresSequence" in shared:
        # A projection image has no slice thickness; highdicom copies the spacing into a Pixel
        # Measures item without it, which its own reader (and others) reject. The SEG is
        # pixel-aligned with the referenced source, which keeps the spacing.
        del shared.PixelMeasuresSequence
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()
