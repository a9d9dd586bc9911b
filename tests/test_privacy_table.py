"""The packaged PS3.15 Table E.1-1: well-formed, complete enough, and right on well-known rows."""

from __future__ import annotations

import pytest
from pydicom.datadict import DicomDictionary

from xrayfm.privacy.annex_e import (
    BASIC_ACTIONS,
    OPTION_ACTIONS,
    OPTION_COLUMNS,
    lookup,
    parse_table,
    profile_table,
)


def test_table_size_and_codes() -> None:
    table = profile_table()
    # Edition 2026c lists 652 exact tags plus 3 repeating-group rows (and the private-attributes row).
    assert len(table.exact) >= 650 and len(table.patterns) == 3
    for row in table.rows():
        assert row.basic in BASIC_ACTIONS, row
        assert set(row.options) <= set(OPTION_COLUMNS), row
        assert set(row.options.values()) <= OPTION_ACTIONS, row


def _norm(name: str) -> str:
    return name.replace(" ", "").replace("(Trial)", "").lower()


def test_names_agree_with_the_pydicom_dictionary() -> None:
    """Each tag's name matches the data dictionary: catches a tag/row mix-up in the table."""
    checked = 0
    for tag, row in profile_table().exact.items():
        entry = DicomDictionary.get(tag)
        if entry is None:  # attributes newer than the installed pydicom
            continue
        assert _norm(row.name) == _norm(entry[2]), (row.tag, row.name, entry[2])
        checked += 1
    assert checked > 600


@pytest.mark.parametrize(
    ("tag", "basic", "options"),
    [
        (0x00100010, "Z", {}),  # Patient's Name
        (0x00100020, "Z", {}),  # Patient ID
        (0x00100030, "Z", {}),  # Patient's Birth Date
        (0x00100040, "Z", {"patient_chars": "K"}),  # Patient's Sex
        (0x00101010, "X", {"patient_chars": "K"}),  # Patient's Age
        (0x0020000D, "U", {"uids": "K"}),  # Study Instance UID
        (0x00080018, "U", {"uids": "K"}),  # SOP Instance UID
        (0x00080080, "X/Z/D", {"institution": "K"}),  # Institution Name
        (0x00081010, "X/Z/D", {"device": "K"}),  # Station Name
        (0x00080050, "Z", {}),  # Accession Number
        (0x00080090, "Z", {}),  # Referring Physician's Name
        (0x00081030, "X", {"clean_desc": "C"}),  # Study Description
        (0x00080020, "Z", {"long_full_dates": "K", "long_modified_dates": "C"}),  # Study Date
        (0x00081140, "X/Z/U*", {"uids": "K"}),  # Referenced Image Sequence
        (0x00400275, "X", {"clean_desc": "C"}),  # Request Attributes Sequence
    ],
)
def test_well_known_rows(tag: int, basic: str, options: dict[str, str]) -> None:
    row = lookup(tag)
    assert row is not None
    assert row.basic == basic
    assert row.options == options


def test_repeating_groups_and_unlisted_tags() -> None:
    assert lookup(0x60003000).name == "Overlay Data"
    assert lookup(0x601E4000).name == "Overlay Comments"
    assert lookup(0x50020010).name == "Curve Data"
    assert lookup(0x00280010) is None  # Rows: not an identifier
    assert lookup(0x00080060) is None  # Modality


def test_parse_rejects_duplicates_and_bad_codes() -> None:
    header = "\t".join(["tag", "name", "basic", *OPTION_COLUMNS])
    empty = "\t" * len(OPTION_COLUMNS)
    row = f"(0010,0010)\tPatient's Name\tZ{empty}"
    with pytest.raises(ValueError, match="duplicate tag"):
        parse_table(f"{header}\n{row}\n{row}")
    with pytest.raises(ValueError, match="unknown Basic Profile action"):
        parse_table(header + "\n" + row.replace("\tZ\t", "\tQ\t"))
    with pytest.raises(ValueError, match="cells"):
        parse_table(f"{header}\n(0010,0010)\tPatient's Name\tZ")
