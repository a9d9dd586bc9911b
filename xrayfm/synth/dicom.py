"""Synthetic C-arm DICOM: XA instances with a mobile C-arm's headers and a FAKE, seeded identity.

Every name, ID, date, address and institution below is invented and drawn deterministically from
the run seed, so de-identification can be tested on files that look like clinical exports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from xrayfm.config import atomic_write_bytes
from xrayfm.synth.geometry import View
from xrayfm.synth.physics import Exposure

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
PRIVATE_GROUP = 0x0029
PRIVATE_CREATOR = "VELTRIX CARM 1.0"
MANUFACTURER = "Veltrix Medical"
MODEL = "Veltrix Arc 9 Mobile"

_FIRST = ["Anna", "Jonas", "Maria", "Lukas", "Sofia", "Elias", "Lea", "Noah", "Emma", "Felix", "Mila", "Paul",
          "Clara", "Oskar", "Ida", "Theo", "Greta", "Anton", "Marta", "Henrik"]
_LAST = ["Bergmann", "Okafor", "Lindqvist", "Moreau", "Kowalski", "Haddad", "Novak", "Brennan", "Castell",
         "Yilmaz", "Ferreira", "Tanaka", "Johansson", "Albrecht", "Costa", "Duval", "Petrov", "Nakamura"]
_STREETS = ["Lindenweg", "Harbour Road", "Rue des Tilleuls", "Maple Street", "Kastanienallee", "Station Road"]
_CITIES = ["Northbridge", "Eastwick", "Lakeport", "Westerholm", "Riverton", "Fairhaven"]
_HOSPITALS = ["St. Aurelia Hospital", "Northbridge General Hospital", "Lakeport University Clinic",
              "Riverton Spine Centre"]


def synthetic_uid(*parts: object) -> str:
    """Deterministic, valid UID from ``parts`` ("2.25." + decimal of a 128-bit hash)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()[:15]
    return "2.25." + str(int.from_bytes(digest, "big"))


@dataclass
class FakePatient:
    """Invented identity of one synthetic patient and their study."""

    name: str
    patient_id: str
    birth_date: str
    sex: str
    address: str
    institution: str
    institution_address: str
    referring: str
    performing: str
    operator: str
    accession: str
    study_date: str
    study_time: str
    private_id: str

    @property
    def phi_values(self) -> dict[str, str]:
        return {"PatientName": self.name, "PatientID": self.patient_id, "PatientBirthDate": self.birth_date,
                "PatientAddress": self.address, "InstitutionName": self.institution,
                "ReferringPhysicianName": self.referring, "AccessionNumber": self.accession,
                "PrivateID": self.private_id}


def fake_patient(seed: int, index: int) -> FakePatient:
    """Draw patient ``index`` of run ``seed`` (same inputs -> same identity)."""
    rng = np.random.default_rng([seed, index, 7919])

    def person() -> str:
        return f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}"

    sex = "F" if rng.random() < 0.5 else "M"
    study = date(2019, 1, 1) + timedelta(days=int(rng.integers(0, 2000)))
    birth = study - timedelta(days=int(rng.integers(25 * 365, 85 * 365)))
    city = rng.choice(_CITIES)
    return FakePatient(
        name=person(), patient_id=f"P{rng.integers(10**6, 10**7)}", birth_date=birth.strftime("%Y%m%d"), sex=sex,
        address=f"{rng.integers(1, 120)} {rng.choice(_STREETS)}, {rng.integers(10000, 99999)} {city}",
        institution=str(rng.choice(_HOSPITALS)), institution_address=f"{rng.integers(1, 60)} Hospital Way, {city}",
        referring=person(), performing=person(), operator=person(),
        accession=f"A{rng.integers(10**8, 10**9)}", study_date=study.strftime("%Y%m%d"),
        study_time=f"{rng.integers(7, 18):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}",
        private_id=f"VX-{rng.integers(10**5, 10**6)}")


def xa_dataset(pixels: np.ndarray, patient: FakePatient, view: View, exposure: Exposure, *, seed: int,
               patient_index: int, series_number: int, instance_number: int, source: str) -> Dataset:
    """Build an XA instance (uint16 MONOCHROME2, 16 bits stored, uncompressed) for one image."""
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError(f"pixels must be a 2-D uint16 array, got {pixels.dtype} {pixels.shape}")
    study_uid = synthetic_uid("study", seed, patient_index)
    series_uid = synthetic_uid("series", seed, patient_index, series_number)
    sop_uid = synthetic_uid("sop", seed, patient_index, series_number, instance_number)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XA_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = synthetic_uid("xrayfm-synth-implementation")
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = XA_SOP_CLASS, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "XA"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = patient.study_date
    st = patient.study_time
    secs = int(st[:2]) * 3600 + int(st[2:4]) * 60 + int(st[4:6]) + series_number * 60 + instance_number * 2
    t = f"{secs // 3600 % 24:02d}{secs // 60 % 60:02d}{secs % 60:02d}"  # a valid TM, seconds < 60
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = st, t, t
    ds.AccessionNumber = patient.accession
    ds.StudyID = str(1000 + patient_index)
    ds.StudyDescription = "Intraoperative fluoroscopy"
    ds.SeriesDescription = f"Fluoro {series_number}"
    ds.SeriesNumber, ds.InstanceNumber = series_number, instance_number
    ds.PatientName, ds.PatientID = patient.name, patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = patient.birth_date, patient.sex
    ds.PatientAddress = patient.address
    ds.InstitutionName, ds.InstitutionAddress = patient.institution, patient.institution_address
    ds.ReferringPhysicianName = patient.referring
    ds.PerformingPhysicianName = patient.performing
    ds.OperatorsName = patient.operator
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, MODEL
    ds.DeviceSerialNumber = f"VX{(seed * 7 + patient_index) % 90000 + 10000}"
    ds.SoftwareVersions = "xrayfm-synth"
    ds.StationName = "CARM-OR2"
    ds.BodyPartExamined = "SPINE"
    ds.KVP = f"{70 + 40 * min(1.0, view.field_mm / 300):.0f}"
    ds.ExposureTime = 20
    ds.XRayTubeCurrent = round(2 + exposure.dose / 500)
    ds.Exposure = round(exposure.dose / 200)
    ds.DistanceSourceToDetector = f"{view.sid_mm:.1f}"
    ds.DistanceSourceToPatient = f"{view.sod_mm:.1f}"
    ds.PositionerPrimaryAngle = f"{view.lao_deg:.1f}"
    ds.PositionerSecondaryAngle = f"{view.cran_deg:.1f}"
    ds.ImagerPixelSpacing = [f"{view.pixel_mm:.4f}", f"{view.pixel_mm:.4f}"]
    ds.EstimatedRadiographicMagnificationFactor = f"{view.sid_mm / view.sod_mm:.4f}"
    ds.FieldOfViewShape = "ROUND" if view.circular else "RECTANGLE"
    ds.FieldOfViewDimensions = [round(view.field_mm)] if view.circular else [round(view.field_mm)] * 2
    ds.DerivationDescription = f"Synthetic DRR rendered from CT {source} by xrayfm"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", patient.private_id)
    block.add_new(0x02, "LO", f"{patient.name} / {patient.patient_id}")
    return ds


def write_dicom(path: str | Path, ds: Dataset) -> None:
    """Write ``ds`` as a DICOM Part 10 file, atomically."""
    from io import BytesIO

    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())
