"""Prediction findings as a DICOM Comprehensive SR (TID 1500 Measurement Report), via highdicom.

Content of the report (one per predicted frame):

* observation context: a *device* observer, the algorithm (``xrayfm ARCH``, version); no person.
  Procedure reported: LN 43468-8 "XR unspecified body region".
* ``body region`` group (TID 1501, image level, referencing the source image/frame): qualitative
  evaluation DCM 123014 "Target Region" = the top-1 region's code (:data:`REGION_CODES`), and
  the top-3 as DCM 122157 "Probability" measurements (unit ``{ratio}``), each with its region as
  finding site.
* ``screw N`` groups (TID 1410 planar ROI), one per screw in ``result`` (the bundle decodes only
  screws at or above its operating threshold): finding type SCT 68183006 "Bone screw", image
  region a POLYLINE head -> tip on the source image, measurements SCT 410668003 "Length" (mm
  when the pixel spacing is known, else ``{pixels}``), SCT 1483009 "Angle" (deg, from +x towards
  +y, image down) and DCM 111012 "Certainty of Finding" (%, 100 x confidence, as in the CAD
  templates).
* ``metal`` group when the mask has pixels: finding type SCT 425620007 "Metal", SCT 42798000
  "Area" (mm² when spacing is known, else ``{pixels}``). With a SEG of the same frame it is a
  planar ROI referencing segment 1 of that SEG (which is then listed as evidence too), else an
  image-level group.

Coordinates: our points (:mod:`xrayfm.conventions`) put the origin at the top-left corner of the
top-left pixel with pixel centres at +0.5, which is exactly the DICOM SCOORD pixel convention
(PS3.3 C.18.6.1.1: TLHC of the TLHC pixel is 0.0\\0.0, its centre 0.5\\0.5), so ``(x, y)`` is
written unchanged as (column, row). Multi-frame sources are referenced by frame number.

As the standard requires, the SR copies the source's patient and study modules: it is as
identifying as the input file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# Our body-region names -> SNOMED CT body structure codes (pydicom's codes.SCT names).
REGION_CODES: dict[str, Code] = {
    "head": codes.SCT.Head,  # 69536005
    "skull": codes.SCT.Skull,  # 89546000
    "cervical_spine": codes.SCT.CervicalSpine,  # 122494005
    "shoulder": codes.SCT.Shoulder,  # 16982005
    "thorax": codes.SCT.Thorax,  # 816094009
    "thoracic_spine": codes.SCT.ThoracicSpine,  # 122495006
    "lumbar_spine": codes.SCT.LumbarSpine,  # 122496007
    "abdomen": codes.SCT.Abdomen,  # 818981001
    "pelvis": codes.SCT.Pelvis,  # 816092008
    "hip": codes.SCT.Hip,  # 29836001
    "knee": codes.SCT.Knee,  # 72696002
    "upper_limb": codes.SCT.UpperLimb,  # 53120007
    "lower_limb": codes.SCT.LowerLimb,  # 61685007
}
LOCAL_SCHEME = "99XRAYFM"  # private coding scheme for class names of custom classifiers
SCREW_CODE = codes.SCT.BoneScrew  # 68183006
METAL_CODE = Code("425620007", "SCT", "Metal")
PIXELS = Code("{pixels}", "UCUM", "pixels")
PERCENT = Code("%", "UCUM", "percent")
# Type 2 patient/study attributes highdicom reads from the source; absent ones become empty.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def region_code(name: str) -> Code:
    """SNOMED CT code of a region name; a local-scheme code for names outside :data:`REGION_CODES`."""
    return REGION_CODES.get(name) or Code(name, LOCAL_SCHEME, name)


def findings_sr_bytes(
    source: str | Path,
    result: dict[str, Any],
    model_name: str,
    version: str,
    seg_path: str | Path | None = None,
    frame_index: int = 0,
) -> bytes:
    """Encoded Comprehensive SR of one ``ModelBundle.predict`` result on frame ``frame_index``
    (0-based) of the DICOM ``source``; ``seg_path``: the metal SEG written for that frame."""
    import highdicom as hd
    import pydicom

    from xrayfm.io.dicom_meta import pixel_spacing
    from xrayfm.serve.dicom_seg import derived_object_kwargs

    ds = pydicom.dcmread(source, stop_before_pixels=True)
    name = Path(source).name
    missing = [
        kw
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if kw not in ds
    ]
    if missing:
        raise ValueError(
            f"{name} lacks {', '.join(missing)}; an SR can only reference a complete DICOM image"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame_index < frames:
        raise ValueError(f"{name}: frame index {frame_index} is outside its {frames} frame(s)")
    if (result["height"], result["width"]) != (int(ds.Rows), int(ds.Columns)):
        raise ValueError(
            f"{name}: result is {result['height']}x{result['width']} but the source is "
            f"{ds.Rows}x{ds.Columns}; pass the prediction of this file"
        )
    for kw in _TYPE2:
        if kw not in ds:
            setattr(ds, kw, "")
    frame_numbers = [frame_index + 1] if frames > 1 else None
    spacing, _ = pixel_spacing(ds, frame_index)
    algorithm = hd.sr.AlgorithmIdentification(name=f"xrayfm {model_name}", version=version)

    groups: list[Any] = []
    if "top3" in result:
        groups.append(_region_group(hd, ds, result["top3"], frame_numbers, algorithm))
    for i, screw in enumerate(result.get("screws", []), start=1):
        source = hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID, frame_numbers)
        groups.append(_screw_group(hd, i, screw, spacing, source, algorithm))
    evidence = [ds]
    area_px = int(np.count_nonzero(result["metal_mask"])) if "metal_mask" in result else 0
    if area_px:
        seg = _checked_seg(seg_path, ds, frames) if seg_path is not None else None
        if seg is not None:
            evidence.append(seg)
        groups.append(_metal_group(hd, ds, area_px, spacing, seg, frame_numbers, algorithm))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=pydicom.uid.generate_uid(entropy_srcs=["xrayfm", model_name, version]),
            name=f"xrayfm {model_name}"[:64],
            manufacturer_name="xrayfm",
            model_name=model_name[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.XRUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    with warnings.catch_warnings():
        # highdicom warns about odd person names and quotes them: no patient data in our logs.
        warnings.simplefilter("ignore", UserWarning)
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=report,
            **derived_object_kwargs(model_name, version, series_number=9002),
            is_complete=True,
            series_description="xrayfm findings",
        )
    buf = io.BytesIO()
    sr.save_as(buf)
    return buf.getvalue()


def _region_group(
    hd: Any, ds: Any, top3: list[dict[str, Any]], frame_numbers: list[int] | None, algorithm: Any
) -> Any:
    probs = [
        hd.sr.Measurement(
            name=codes.DCM.Probability,
            value=float(t["probability"]),
            unit=codes.UCUM.Ratio,
            finding_sites=[hd.sr.FindingSite(region_code(t["region"]))],
        )
        for t in top3
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier="body region"),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.DCM.TargetRegion, region_code(top3[0]["region"]))
        ],
        measurements=probs,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID, frame_numbers)
        ],
    )


def _screw_group(
    hd: Any, number: int, screw: dict[str, Any], spacing: list[float] | None, source: Any, algorithm: Any
) -> Any:
    (hx, hy), (tx, ty) = screw["head"], screw["tip"]
    if spacing is None:
        length, unit = float(np.hypot(tx - hx, ty - hy)), PIXELS
    else:
        row, col = spacing
        length, unit = float(np.hypot((tx - hx) * col, (ty - hy) * row)), codes.UCUM.Millimeter
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[hx, hy], [tx, ty]], dtype=np.float64),
        source_image=source,
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"screw {number}"),
        referenced_region=region,
        finding_type=SCREW_CODE,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=codes.SCT.Length, value=length, unit=unit),
            hd.sr.Measurement(name=codes.SCT.Angle, value=float(screw["angle_deg"]), unit=codes.UCUM.Degree),
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding, value=100.0 * float(screw["confidence"]), unit=PERCENT
            ),
        ],
    )


def _checked_seg(seg_path: str | Path, ds: Any, frames: int) -> Any:
    """The SEG's header, after checking it is a one-frame SEG of this very source image."""
    import pydicom

    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    refs = [
        inst.ReferencedSOPInstanceUID
        for series in seg.get("ReferencedSeriesSequence", [])
        for inst in series.get("ReferencedInstanceSequence", [])
    ]
    if (
        seg.get("Modality") != "SEG"
        or frames != 1
        or int(seg.get("NumberOfFrames", 0)) != 1
        or refs != [ds.SOPInstanceUID]
    ):
        raise ValueError(
            f"{Path(seg_path).name} is not a one-frame SEG of {ds.SOPInstanceUID}; "
            "pass the SEG written for this single-frame source or none"
        )
    return seg


def _metal_group(
    hd: Any,
    ds: Any,
    area_px: int,
    spacing: list[float] | None,
    seg: Any,
    frame_numbers: list[int] | None,
    algorithm: Any,
) -> Any:
    if spacing is None:
        area = hd.sr.Measurement(name=codes.SCT.Area, value=float(area_px), unit=PIXELS)
    else:
        mm2 = float(area_px * spacing[0] * spacing[1])
        area = hd.sr.Measurement(name=codes.SCT.Area, value=mm2, unit=codes.UCUM.SquareMillimeter)
    tracking = hd.sr.TrackingIdentifier(identifier="metal")
    if seg is not None:
        segment = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            frame_number=1,
            segment_number=1,
            source_image=hd.sr.SourceImageForSegmentation(ds.SOPClassUID, ds.SOPInstanceUID),
        )
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=segment,
            finding_type=METAL_CODE,
            algorithm_id=algorithm,
            measurements=[area],
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=METAL_CODE,
        algorithm_id=algorithm,
        measurements=[area],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID, frame_numbers)
        ],
    )
