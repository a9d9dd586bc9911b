"""The anonymizer on real-pixel DICOM files full of planted PHI (tests/phi_dicom.py)."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path

import pydicom
import pytest
from phi_dicom import PRIVATE_CREATOR, make_phi_dicom
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from xrayfm.conventions import pixel_hash
from xrayfm.privacy import AnonymizationOptions, Anonymizer, lookup

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _walk_tags(ds: Dataset) -> list[pydicom.tag.BaseTag]:
    tags = []
    for elem in ds:
        tags.append(elem.tag)
        if elem.VR == "SQ":
            for item in elem.value:
                tags.extend(_walk_tags(item))
    return tags


def _as_date(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


@pytest.fixture()
def phi_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "phi.dcm"
    return path, make_phi_dicom(path, seed=3)


@pytest.mark.parametrize("dates", [False, True], ids=["dates-removed", "dates-shifted"])
def test_no_planted_phi_survives(phi_file: tuple[Path, dict[str, str]], dates: bool) -> None:
    path, phi = phi_file
    raw_in = path.read_bytes()
    assert all(v.encode() in raw_in for v in phi.values()), "helper did not plant every value"
    anon = Anonymizer(KEY, AnonymizationOptions(retain_longitudinal_dates=dates))
    out = _bytes(anon.anonymize(pydicom.dcmread(path)).dataset)
    for field, value in phi.items():
        if dates and field == "StudyTime":  # whole-day shifts keep the time of day, by design
            assert pydicom.dcmread(io.BytesIO(out)).StudyTime == value
            continue
        for variant in {value, value.upper(), value.lower()}:
            assert variant.encode() not in out, f"{field} leaked as {variant!r}"
    # pixel data is copied unchanged
    assert pydicom.dcmread(io.BytesIO(out)).PixelData == pydicom.dcmread(path).PixelData


def test_identity_fields_and_marks(phi_file: tuple[Path, dict[str, str]]) -> None:
    path, phi = phi_file
    src = pydicom.dcmread(path)
    result = Anonymizer(KEY).anonymize(src)
    ds = result.dataset
    assert src.PatientID == phi["PatientID"], "input dataset must not be modified"
    assert ds.PatientID == result.ids.patient and str(ds.PatientName) == result.ids.patient
    assert ds.PatientIdentityRemoved == "YES"
    assert [item.CodeValue for item in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert result.date_shift_days is None
    assert "StudyDate" in ds and ds.StudyDate == ""  # Z: present, empty
    assert "AcquisitionDate" not in ds and "InstitutionName" not in ds and "StudyDescription" not in ds
    assert ds.PatientSex == "" and "PatientAge" not in ds
    assert ds.Modality == src.Modality and ds.Rows == src.Rows  # technical attributes kept
    assert ds.SOPClassUID == src.SOPClassUID  # DICOM-defined UIDs kept
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_private_tags_removed_at_every_depth(phi_file: tuple[Path, dict[str, str]]) -> None:
    path, _ = phi_file
    src = pydicom.dcmread(path)
    assert any(t.is_private for t in _walk_tags(src))
    out = Anonymizer(KEY).anonymize(src).dataset
    assert not any(t.is_private for t in _walk_tags(out))
    # keep_safe_private keeps exactly the listed element and its creator, nothing else
    anon = Anonymizer(KEY, AnonymizationOptions(keep_safe_private=True), safe_private=[(PRIVATE_CREATOR, 0x0009, 0x01)])
    kept = anon.anonymize(src).dataset
    private = sorted(t for t in _walk_tags(kept) if t.is_private)
    assert private == [0x00090010, 0x00091001]
    assert "113111" in [item.CodeValue for item in kept.DeidentificationMethodCodeSequence]


def test_nested_sequences(phi_file: tuple[Path, dict[str, str]]) -> None:
    path, phi = phi_file
    anon = Anonymizer(KEY)
    ds = anon.anonymize(pydicom.dcmread(path)).dataset
    assert "RequestAttributesSequence" not in ds and "OtherPatientIDsSequence" not in ds  # X: removed whole
    top = ds.ReferencedImageEvidenceSequence[0]
    assert top.StudyInstanceUID == ds.StudyInstanceUID == anon.uid(phi["StudyInstanceUID"])
    level2 = top.ReferencedSeriesSequence[0]
    assert level2.SeriesInstanceUID == anon.uid(phi["nested2.SeriesInstanceUID"])
    assert "SeriesDate" not in level2 and "OperatorsName" not in level2
    level3 = level2.ReferencedSOPSequence[0]
    assert level3.ReferencedSOPInstanceUID == anon.uid(phi["nested3.ReferencedSOPInstanceUID"])
    assert level3.ReferencedSOPClassUID == pydicom.dcmread(path).SOPClassUID  # DICOM-registered UID kept
    assert "InstitutionName" not in level3


def test_uids_consistent_within_a_study(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.10.999.1.1"
    a = make_phi_dicom(tmp_path / "a.dcm", seed=1, StudyInstanceUID=study)
    b = make_phi_dicom(tmp_path / "b.dcm", seed=2, StudyInstanceUID=study)
    assert a["SeriesInstanceUID"] != b["SeriesInstanceUID"]
    anon = Anonymizer(KEY)
    ra = anon.anonymize(pydicom.dcmread(tmp_path / "a.dcm"))
    rb = Anonymizer(KEY).anonymize(pydicom.dcmread(tmp_path / "b.dcm"))
    assert ra.dataset.StudyInstanceUID == rb.dataset.StudyInstanceUID != study
    assert ra.ids.study == rb.ids.study
    assert ra.dataset.SeriesInstanceUID != rb.dataset.SeriesInstanceUID
    uid = ra.dataset.SOPInstanceUID
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_pseudonyms_depend_on_the_key_only(phi_file: tuple[Path, dict[str, str]]) -> None:
    path, _ = phi_file
    ds = pydicom.dcmread(path)
    first, second = Anonymizer(KEY).anonymize(ds), Anonymizer(KEY).anonymize(ds)
    other = Anonymizer(OTHER_KEY).anonymize(ds)
    assert first.ids == second.ids
    assert _bytes(first.dataset) == _bytes(second.dataset)
    for field in ("patient", "study", "series", "instance"):
        assert getattr(first.ids, field) != getattr(other.ids, field)
    assert first.dataset.StudyInstanceUID != other.dataset.StudyInstanceUID
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Anonymizer(b"short")


def test_longitudinal_dates_keep_intervals(tmp_path: Path) -> None:
    opts = AnonymizationOptions(retain_longitudinal_dates=True)
    make_phi_dicom(tmp_path / "s1.dcm", seed=11, PatientID="PAT-LONG-1", StudyDate="20180110")
    make_phi_dicom(tmp_path / "s2.dcm", seed=12, PatientID="PAT-LONG-1", StudyDate="20180320")
    r1 = Anonymizer(KEY, opts).anonymize(pydicom.dcmread(tmp_path / "s1.dcm"))
    r2 = Anonymizer(KEY, opts).anonymize(pydicom.dcmread(tmp_path / "s2.dcm"))
    assert r1.ids.patient == r2.ids.patient
    assert r1.date_shift_days == r2.date_shift_days and -365 <= r1.date_shift_days <= -1
    d1, d2 = _as_date(r1.dataset.StudyDate), _as_date(r2.dataset.StudyDate)
    assert (d2 - d1).days == (date(2018, 3, 20) - date(2018, 1, 10)).days
    assert (d1 - date(2018, 1, 10)).days == r1.date_shift_days
    assert r1.dataset.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "113107" in [item.CodeValue for item in r1.dataset.DeidentificationMethodCodeSequence]
    assert r1.dataset.PatientBirthDate == ""  # Z in every option column: never shifted, always emptied


def test_retain_options(phi_file: tuple[Path, dict[str, str]]) -> None:
    path, phi = phi_file
    src = pydicom.dcmread(path)
    opts = AnonymizationOptions(retain_patient_characteristics=True, retain_device_identity=True)
    ds = Anonymizer(KEY, opts).anonymize(src).dataset
    assert ds.PatientSex == src.PatientSex and ds.StationName == phi["StationName"]
    assert "InstitutionName" not in ds  # institution identity is not retained by these options


def _first_unlisted(vr: str) -> tuple[int, str]:
    for tag, entry in sorted(DicomDictionary.items()):
        if entry[0] == vr and entry[3] == "" and lookup(tag) is None and tag >> 16 not in (0x0002, 0xFFFE):
            return tag, entry[4]
    raise AssertionError(f"no unlisted {vr} attribute in the dictionary")


def test_unlisted_names_and_dates_are_not_kept(phi_file: tuple[Path, dict[str, str]]) -> None:
    path, _ = phi_file
    src = pydicom.dcmread(path)
    pn_tag, _ = _first_unlisted("PN")
    da_tag, _ = _first_unlisted("DA")
    src.add_new(pn_tag, "PN", "Unlisted^Person")
    src.add_new(da_tag, "DA", "20190203")
    removed = Anonymizer(KEY).anonymize(src).dataset
    assert pn_tag not in removed and da_tag not in removed
    result = Anonymizer(KEY, AnonymizationOptions(retain_longitudinal_dates=True)).anonymize(src)
    assert (_as_date(result.dataset[da_tag].value) - date(2019, 2, 3)).days == result.date_shift_days


def test_quarantine(phi_file: tuple[Path, dict[str, str]]) -> None:
    path, _ = phi_file
    anon, admit = Anonymizer(KEY), Anonymizer(KEY, AnonymizationOptions(admit_burned_in=True))
    ds = pydicom.dcmread(path)
    assert anon.quarantine_reason(ds) is None
    burned = pydicom.dcmread(path)
    burned.BurnedInAnnotation = "YES"
    assert anon.quarantine_reason(burned) == "burned_in_annotation"
    sc = pydicom.dcmread(path)
    sc.SOPClassUID = SecondaryCaptureImageStorage
    assert anon.quarantine_reason(sc) == "secondary_capture"
    multiframe_sc = pydicom.dcmread(path)
    multiframe_sc.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    assert anon.quarantine_reason(multiframe_sc) == "secondary_capture"
    screen = pydicom.dcmread(path)
    screen.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    assert anon.quarantine_reason(screen) == "secondary_capture"
    reformat = pydicom.dcmread(path)
    reformat.ImageType = ["DERIVED", "SECONDARY", "OTHER"]  # a derived image, not a screenshot
    assert anon.quarantine_reason(reformat) is None
    converted = pydicom.dcmread(path)
    converted.ConversionType = "WSD"
    assert anon.quarantine_reason(converted) == "secondary_capture"
    for case in (burned, sc, screen, converted):
        assert admit.quarantine_reason(case) is None


SHARED_XRAY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray"


@pytest.mark.parametrize("name", ["animal_thorax_dx_highdicom.dcm", "chest_cr_siim_sternotomy_wires.dcm"])
def test_real_shared_dicoms(name: str) -> None:
    path = SHARED_XRAY / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the team data folder ../shared is absent on this machine")
    src = pydicom.dcmread(path)
    identifiers = [str(src.PatientName), src.PatientID, src.StudyInstanceUID, src.SOPInstanceUID, src.StudyDate]
    anon = Anonymizer(KEY, AnonymizationOptions(admit_burned_in=True))
    out = _bytes(anon.anonymize(src).dataset)
    for value in identifiers:
        assert value.encode() not in out, value
    assert pixel_hash(pydicom.dcmread(io.BytesIO(out)).pixel_array) == pixel_hash(src.pixel_array)
    # the SIIM file is a Secondary Capture (converted from PNG): quarantined unless admitted
    expected = "secondary_capture" if src.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.7") else None
    assert Anonymizer(KEY).quarantine_reason(src) == expected


def test_unknown_vr_elements_are_not_kept_raw(phi_file: tuple[Path, dict[str, str]]) -> None:
    """An identifier stored with VR UN (raw bytes) cannot be rewritten, so it is removed."""
    path, _ = phi_file
    src = pydicom.dcmread(path)
    src.add_new(0x00081060, "UN", b"Reader^Hidden")  # Name of Physician(s) Reading Study as raw UN
    src.add_new(0x00181012, "UN", b"20200202")  # Date of Secondary Capture as raw UN
    src.add_new(0x00F00010, "UN", b"unknown public")  # not in the data dictionary
    out = Anonymizer(KEY).anonymize(src).dataset
    assert 0x00081060 not in out and 0x00181012 not in out and 0x00F00010 not in out
    assert b"Hidden" not in _bytes(out)


@pytest.mark.parametrize("dates", [False, True], ids=["dates-removed", "dates-shifted"])
def test_in_place_equals_copy(phi_file: tuple[Path, dict[str, str]], dates: bool) -> None:
    """``in_place=True`` (ingest's path, no deep copy) writes the same bytes as the copying path."""
    path, _ = phi_file
    anon = Anonymizer(KEY, AnonymizationOptions(retain_longitudinal_dates=dates))
    src = pydicom.dcmread(path)
    before = _bytes(src)
    copied = anon.anonymize(src)
    assert _bytes(src) == before  # the copying path leaves its input alone
    in_place = anon.anonymize(src, in_place=True)
    assert in_place.dataset is src
    assert in_place.ids == copied.ids and in_place.date_shift_days == copied.date_shift_days
    assert _bytes(in_place.dataset) == _bytes(copied.dataset)
