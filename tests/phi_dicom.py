"""Test helper: a real-pixel DICOM file carrying planted PHI everywhere a real one can.

``make_phi_dicom(path, seed)`` takes a real radiograph (pydicom-data ``RG3_UNCR.dcm``, an ankle CR,
or pydicom's ``CT_small.dcm`` when pydicom-data is missing), subsamples its pixels to at most 256
px a side, and plants distinctive seeded identifiers: names, IDs, dates, addresses, physicians,
institution, private tags and identifiers nested two and three sequence levels deep. It returns
``{field: planted value}`` so a test can byte-search an output for every one of them.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

PRIVATE_CREATOR = "XRAYFM PHI TEST 1.0"
MAX_SIDE = 256


def _source() -> Dataset:
    path = get_testdata_file("RG3_UNCR.dcm") or get_testdata_file("CT_small.dcm")
    if path is None:
        raise FileNotFoundError("neither RG3_UNCR.dcm (pydicom-data) nor CT_small.dcm (pydicom) is available")
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    step = max(1, -(-max(arr.shape) // MAX_SIDE))
    small = np.ascontiguousarray(arr[::step, ::step])
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _item(**attrs: object) -> Dataset:
    item = Dataset()
    for keyword, value in attrs.items():
        setattr(item, keyword, value)
    return item


def make_phi_dicom(path: str | Path, seed: int = 0, **overrides: str) -> dict[str, str]:
    """Write the PHI-laden DICOM to ``path``; return the planted strings by field name.

    ``overrides`` set top-level attributes by DICOM keyword (e.g. ``PatientID="P1"``,
    ``StudyInstanceUID=...``, ``StudyDate="20200101"``) to build several studies of one patient,
    or add non-PHI attributes (``BurnedInAnnotation="YES"``); an override of a planted field
    replaces its value in the returned dict, other overrides are not returned.
    """
    rng = random.Random(seed)

    def word(prefix: str) -> str:
        return prefix + "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(6))

    def number(n: int) -> str:  # no leading zero, so it is also a valid UID component
        return rng.choice("123456789") + "".join(rng.choice("0123456789") for _ in range(n - 1))

    def a_date(first_year: int) -> str:
        return f"{first_year + rng.randrange(5)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"

    def a_uid() -> str:
        return f"1.2.826.0.1.3680043.10.9{seed % 100}.{number(12)}.{number(8)}"

    family, given = word("Fam"), word("Giv")
    phi = {
        "PatientName": f"{family}^{given}",
        "PatientName.family": family,
        "PatientName.given": given,
        "PatientID": "PID" + number(9),
        "PatientBirthDate": a_date(1940),
        "PatientAddress": f"{number(3)} {word('Street')} Road, {word('Town')}",
        "PatientTelephoneNumbers": "+49" + number(10),
        "OtherPatientID": "OPID" + number(8),
        "ReferringPhysicianName": word("Ref") + "^" + word("Doc"),
        "PerformingPhysicianName": word("Perf") + "^" + word("Doc"),
        "OperatorsName": word("Oper") + "^" + word("Tech"),
        "InstitutionName": word("Klinikum") + " Hospital",
        "InstitutionAddress": f"{number(2)} {word('Avenue')} Street",
        "StationName": word("STN"),
        "AccessionNumber": "ACC" + number(10),
        "StudyID": "SID" + number(7),
        "StudyDate": a_date(2015),
        "SeriesDate": a_date(2015),
        "AcquisitionDate": a_date(2015),
        "ContentDate": a_date(2015),
        "StudyTime": f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
        "StudyDescription": f"Follow-up of {family} after fall",
        "StudyInstanceUID": a_uid(),
        "SeriesInstanceUID": a_uid(),
        "SOPInstanceUID": a_uid(),
        "RequestedProcedureID": "RPID" + number(8),
        "ReferencedStudyUID": a_uid(),
        "Private.PatientID": "PRIV" + number(9),
        "Private.PatientName": word("PrivFam") + "^" + word("PrivGiv"),
        "nested2.OperatorsName": word("DeepOper") + "^" + word("Tech"),
        "nested2.SeriesDate": a_date(2010),
        "nested3.InstitutionName": word("DeepKlinik") + " Center",
        "nested2.SeriesInstanceUID": a_uid(),
        "nested3.ReferencedSOPInstanceUID": a_uid(),
        "nested.Private.ID": "NPRIV" + number(8),
    }
    phi.update({k: v for k, v in overrides.items() if k in phi})

    ds = _source()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
                    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName",
                    "InstitutionAddress", "StationName", "AccessionNumber", "StudyID", "StudyDate",
                    "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "StudyDescription",
                    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, phi[keyword])
    ds.file_meta.MediaStorageSOPInstanceUID = phi["SOPInstanceUID"]
    ds.OtherPatientIDsSequence = Sequence([_item(PatientID=phi["OtherPatientID"], IssuerOfPatientID="HIS")])
    ds.RequestAttributesSequence = Sequence([_item(
        RequestedProcedureID=phi["RequestedProcedureID"],
        ReferencedStudySequence=Sequence([_item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
            ReferencedSOPInstanceUID=phi["ReferencedStudyUID"],
        )]),
    )])
    # A sequence the profile keeps and cleans item by item: identifiers two and three levels down.
    level3 = _item(ReferencedSOPClassUID=ds.SOPClassUID,
                   ReferencedSOPInstanceUID=phi["nested3.ReferencedSOPInstanceUID"],
                   InstitutionName=phi["nested3.InstitutionName"])
    level2 = _item(SeriesInstanceUID=phi["nested2.SeriesInstanceUID"], SeriesDate=phi["nested2.SeriesDate"],
                   OperatorsName=phi["nested2.OperatorsName"], ReferencedSOPSequence=Sequence([level3]))
    block = level2.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", phi["nested.Private.ID"])
    ds.ReferencedImageEvidenceSequence = Sequence([_item(
        StudyInstanceUID=phi["StudyInstanceUID"], ReferencedSeriesSequence=Sequence([level2]),
    )])
    top_block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    top_block.add_new(0x01, "LO", phi["Private.PatientID"])
    top_block.add_new(0x02, "PN", phi["Private.PatientName"])
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    ds.save_as(Path(path), enforce_file_format=True)
    return phi
