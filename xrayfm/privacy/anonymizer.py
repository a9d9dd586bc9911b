"""De-identify a pydicom Dataset with the PS3.15 Annex E Basic Profile, keyed pseudonyms and options.

Every element, at any depth of nested sequences, gets one action:

* listed in Table E.1-1: its Basic Profile action, replaced by the action of each enabled Option
  (device identity, patient characteristics, longitudinal modified dates; later ones win); a
  compound action (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) takes its first, most protective letter;
* not listed: person names (PN) are removed, dates and times (DA, DT, TM) are removed or, with
  ``retain_longitudinal_dates``, shifted; UIDs outside the DICOM root are remapped; sequences
  are cleaned item by item; everything else is kept, as the profile keeps it;
* private elements are removed unless ``keep_safe_private`` and listed as safe.

PatientID and PatientName become the keyed patient pseudonym; UIDs map through :meth:`Anonymizer.uid`
so one source UID gives one new UID across a whole data set and across runs with the same key.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from xrayfm.privacy.annex_e import lookup

SECONDARY_CAPTURE_SOP = "1.2.840.10008.5.1.4.1.1.7"
DICOM_UID_ROOT = "1.2.840.10008."
MIN_KEY_BYTES = 16
DUMMY_TEXT = "ANONYMIZED"
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
NUMERIC_VRS = frozenset({"AT", "FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})
DATE_VRS = frozenset({"DA", "DT", "TM"})
# File Meta Information elements that name the sending/receiving systems or carry private data.
FILE_META_REMOVE = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)
# PS3.16 CID 7050 De-identification Method codes (scheme DCM).
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_PATIENT = ("113108", "Retain Patient Characteristics Option")
CODE_DEVICE = ("113109", "Retain Device Identity Option")
CODE_SAFE_PRIVATE = ("113111", "Retain Safe Private Option")
PATIENT_ID = 0x00100020


@dataclass(frozen=True)
class AnonymizationOptions:
    """Which PS3.15 Annex E Options to apply on top of the Basic Profile."""

    retain_longitudinal_dates: bool = False  # shift dates by a per-patient keyed offset instead of removing
    retain_device_identity: bool = False
    retain_patient_characteristics: bool = False  # sex, age, size, weight, ...
    keep_safe_private: bool = False  # keep private elements listed as safe (none unless given)
    admit_burned_in: bool = False  # admit images flagged or typed as carrying burned-in text


@dataclass
class PseudoIds:
    """Keyed pseudonyms of the patient, study, series and instance (stable for one key)."""

    patient: str
    study: str
    series: str
    instance: str


@dataclass
class AnonymizationResult:
    dataset: Dataset  # anonymized copy (or the input, anonymized in place); PixelData is untouched
    ids: PseudoIds
    date_shift_days: int | None  # the offset applied to dates, None when dates were removed


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _values(elem: DataElement) -> list[str]:
    """Element value as a list of strings (multi-valued or not); [] when empty."""
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _dummy(vr: str) -> object:
    """A non-empty placeholder value that fits the VR."""
    if vr == "DA":
        return "19000101"
    if vr == "DT":
        return "19000101000000"
    if vr == "TM":
        return "000000"
    if vr == "AS":
        return "000D"
    if vr in ("IS", "DS"):
        return "0"
    if vr in TEXT_VRS:
        return DUMMY_TEXT
    if vr in NUMERIC_VRS:
        return 0
    return b"\x00" * 8  # OB, OD, OF, OL, OV, OW: zero bytes, a multiple of every word size


def _empty(vr: str) -> object:
    """A zero-length value of the VR."""
    if vr in TEXT_VRS or vr in DATE_VRS or vr in ("AS", "DS", "IS", "UI"):
        return ""
    return None if vr in NUMERIC_VRS else b""


def _shift(vr: str, text: str, days: int) -> str | None:
    """Shift one DA or DT value by ``days``; None if it is not a full date."""
    head = text.strip()[:8]
    if len(head) != 8 or not head.isdigit():
        return None
    try:
        moved = date(int(head[:4]), int(head[4:6]), int(head[6:8])) + timedelta(days=days)
    except ValueError:
        return None
    return moved.strftime("%Y%m%d") + (text.strip()[8:] if vr == "DT" else "")


class Anonymizer:
    """Keyed, deterministic de-identifier; one instance can process a whole data set."""

    def __init__(self, key: bytes, options: AnonymizationOptions = AnonymizationOptions(),
                 safe_private: Iterable[tuple[str, int, int]] = ()) -> None:
        """``safe_private``: (private creator, group, element low byte) triples kept by
        ``keep_safe_private``, e.g. ("ACME 1.0", 0x0009, 0x01) for (0009,xx01)."""
        if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"anonymization key must be at least {MIN_KEY_BYTES} bytes; load it with load_or_create_key()"
            )
        self._key = bytes(key)
        self.options = options
        self.safe_private = frozenset((c.strip(), g, e) for c, g, e in safe_private)

    # -- keyed identifiers -------------------------------------------------------------------

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, value: str, kind: str) -> str:
        """HMAC-SHA256(key, kind + value) as 16 hex characters (64 bits)."""
        return self._mac(kind, value).hex()[:16]

    def uid(self, uid: str) -> str:
        """Replacement UID "2.25.<decimal of 128 HMAC bits>": valid, at most 44 characters."""
        return "2.25." + str(int.from_bytes(self._mac("uid", uid.strip().rstrip("\0"))[:16], "big"))

    def date_shift(self, patient_source: str) -> int:
        """Per-patient day offset in [-365, -1] derived from the key and the original patient ID."""
        return -(1 + int.from_bytes(self._mac("date-shift", patient_source)[:8], "big") % 365)

    @staticmethod
    def _patient_source(ds: Dataset) -> str:
        """Original value the patient pseudonym is computed from."""
        pid = _text(ds, "PatientID")
        if pid:
            return pid
        name = _text(ds, "PatientName")
        if name:
            return f"name:{name}|{_text(ds, 'PatientBirthDate')}"
        return f"study:{_text(ds, 'StudyInstanceUID')}"

    def pseudo_ids(self, ds: Dataset) -> PseudoIds:
        """Pseudonyms for the dataset's patient, study, series and instance."""
        patient = self._patient_source(ds)
        study = _text(ds, "StudyInstanceUID") or f"no-study:{patient}"
        series = _text(ds, "SeriesInstanceUID") or f"no-series:{study}"
        instance = _text(ds, "SOPInstanceUID") or f"no-instance:{series}:{_text(ds, 'InstanceNumber')}"
        return PseudoIds(
            patient=self.pseudonym(patient, "patient"),
            study=self.pseudonym(study, "study"),
            series=self.pseudonym(series, "series"),
            instance=self.pseudonym(instance, "instance"),
        )

    # -- admission ---------------------------------------------------------------------------

    def quarantine_reason(self, ds: Dataset) -> str | None:
        """Why ``ds`` must not enter the lake (pixels may show text), or None if admissible."""
        if self.options.admit_burned_in:
            return None
        if _text(ds, "BurnedInAnnotation").upper() == "YES":
            return "burned_in_annotation"
        sop = _text(ds, "SOPClassUID")
        if sop == SECONDARY_CAPTURE_SOP or sop.startswith(SECONDARY_CAPTURE_SOP + "."):
            return "secondary_capture"
        image_type = [v.upper() for v in _values(ds["ImageType"])] if "ImageType" in ds else []
        # Value 2 SECONDARY only means "derived after acquisition" (e.g. MR reformats) and is
        # admissible; screen captures say so in a later value ("SCREEN SAVE", "SCREENSHOT").
        if any("SCREEN" in v for v in image_type):
            return "secondary_capture"
        if _text(ds, "ConversionType"):  # only the SC Equipment module carries it (WSD, SYN, SD, ...)
            return "secondary_capture"
        return None

    # -- de-identification -------------------------------------------------------------------

    def anonymize(self, ds: Dataset, in_place: bool = False) -> AnonymizationResult:
        """Return an anonymized copy of ``ds`` (the input is not modified); with ``in_place``,
        anonymize ``ds`` itself and return it (saves the deep copy when the original is not
        needed afterwards, as in ingest)."""
        ids = self.pseudo_ids(ds)
        shift = self.date_shift(self._patient_source(ds)) if self.options.retain_longitudinal_dates else None
        out = ds if in_place else copy.deepcopy(ds)
        self._clean(out, shift, top=True)
        out.PatientID = ids.patient
        out.PatientName = ids.patient
        self._mark(out, shift)
        meta = getattr(out, "file_meta", None)
        if meta is not None:
            for tag in FILE_META_REMOVE:
                if tag in meta:
                    del meta[tag]
            if "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in out:
                meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        if hasattr(out, "preamble") and out.preamble is not None:
            out.preamble = b"\x00" * 128
        return AnonymizationResult(dataset=out, ids=ids, date_shift_days=shift)

    def _mark(self, ds: Dataset, shift: int | None) -> None:
        """Record what was done: PatientIdentityRemoved, method text and CID 7050 codes."""
        codes = [CODE_BASIC]
        if self.options.retain_longitudinal_dates:
            codes.append(CODE_DATES)
        if self.options.retain_patient_characteristics:
            codes.append(CODE_PATIENT)
        if self.options.retain_device_identity:
            codes.append(CODE_DEVICE)
        if self.options.keep_safe_private and self.safe_private:
            codes.append(CODE_SAFE_PRIVATE)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [meaning for _, meaning in codes] + ["xrayfm keyed HMAC-SHA256 pseudonyms"]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if shift is not None else "REMOVED"

    def _action(self, elem: DataElement, vr: str) -> str:
        """The single action (D, Z, X, K, C, U) for a public element."""
        row = lookup(int(elem.tag))
        if row is None:
            if vr == "SQ":
                return "K"
            if vr == "PN":
                return "X"
            if vr in DATE_VRS:
                return "C" if self.options.retain_longitudinal_dates else "X"
            if vr == "UI":  # DICOM-defined UIDs (SOP classes, transfer syntaxes) identify no one
                return "K" if all(v.startswith(DICOM_UID_ROOT) for v in _values(elem)) else "U"
            return "K"
        action = row.basic
        for enabled, column in (
            (self.options.retain_device_identity, "device"),
            (self.options.retain_patient_characteristics, "patient_chars"),
            (self.options.retain_longitudinal_dates, "long_modified_dates"),
        ):
            if enabled and row.option(column):
                action = row.option(column)
        return action.split("/")[0]

    def _clean(self, ds: Dataset, shift: int | None, top: bool = False) -> None:
        """Apply the profile to every element of ``ds`` and, recursively, of its sequences."""
        kept_private_blocks: set[tuple[int, int]] = set()
        private_creators: list[BaseTag] = []
        for tag in list(ds.keys()):
            elem = ds[tag]
            if tag.is_private:
                if tag.is_private_creator:
                    private_creators.append(tag)
                elif self._safe_private(ds, tag):
                    kept_private_blocks.add((tag.group, tag.element >> 8))
                else:
                    del ds[tag]
                continue
            if tag.element == 0:  # group length, recomputed on write if needed
                del ds[tag]
                continue
            if int(tag) == PATIENT_ID and not top:
                elem.value = self.pseudonym(str(elem.value or "").strip(), "patient")
                continue
            vr = elem.VR
            if vr == "UN":
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    del ds[tag]
                    continue
            self._apply(ds, elem, vr, self._action(elem, vr), shift)
        for tag in private_creators:
            if (tag.group, tag.element) not in kept_private_blocks:
                del ds[tag]

    def _safe_private(self, ds: Dataset, tag: BaseTag) -> bool:
        if not (self.options.keep_safe_private and self.safe_private):
            return False
        creator = ds.get(Tag(tag.group, tag.element >> 8))
        name = str(creator.value).strip() if creator is not None else ""
        return (name, tag.group, tag.element & 0xFF) in self.safe_private

    def _apply(self, ds: Dataset, elem: DataElement, vr: str, action: str, shift: int | None) -> None:
        """Carry out ``action`` on one element whose (resolved) VR is ``vr``."""
        if action == "X" or (elem.VR == "UN" and (action != "K" or vr == "SQ")):  # raw UN bytes: not inspectable
            del ds[elem.tag]
        elif action == "K":
            if vr == "SQ":
                for item in elem.value:
                    self._clean(item, shift)
        elif vr == "SQ":  # Z, D, U or C on a sequence: no generic safe dummy item exists
            elem.value = Sequence([])
        elif action == "Z":
            elem.value = _empty(vr)
        elif action in ("D", "U"):
            if vr == "UI":
                uids = [self.uid(v) for v in _values(elem)]
                elem.value = uids if len(uids) > 1 else (uids[0] if uids else self.uid(""))
            else:
                elem.value = _dummy(vr)
        else:  # C: dates shift under the longitudinal option, times keep, anything else goes
            self._clean_value(ds, elem, vr, shift)

    def _clean_value(self, ds: Dataset, elem: DataElement, vr: str, shift: int | None) -> None:
        if shift is None or vr not in DATE_VRS:
            del ds[elem.tag]
            return
        if vr == "TM":  # a whole-day shift leaves the time of day unchanged
            return
        moved = [_shift(vr, v, shift) for v in _values(elem)]
        if any(m is None for m in moved):
            del ds[elem.tag]
        elif moved:
            elem.value = moved if len(moved) > 1 else moved[0]
