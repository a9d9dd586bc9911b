"""DICOM PS3.15 Annex E Table E.1-1 (Basic Application Level Confidentiality Profile) as data.

The table ships as ``annex_e_basic.tsv`` beside this module: one row per attribute with its Basic
Profile action and the action of each Option column. :func:`profile_table` loads it once;
:func:`lookup` finds the row for a tag, including the repeating-group rows (50xx,xxxx) and
(60xx,3000)/(60xx,4000).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

TABLE_FILE = "annex_e_basic.tsv"
EDITION = "2026c"

# Option columns of Table E.1-1 carried by the TSV, in file order (Retain Safe Private is in code).
OPTION_COLUMNS: tuple[str, ...] = (
    "uids",
    "device",
    "institution",
    "patient_chars",
    "long_full_dates",
    "long_modified_dates",
    "clean_desc",
    "clean_struct",
    "clean_graph",
)
SIMPLE_ACTIONS = frozenset("DZXKCU")
BASIC_ACTIONS = SIMPLE_ACTIONS | {"Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
OPTION_ACTIONS = frozenset({"K", "C", "X"})


@dataclass(frozen=True)
class ProfileRow:
    """One attribute of Table E.1-1: its tag (or repeating pattern), name and actions."""

    tag: str  # as printed in the standard, e.g. "(0010,0010)" or "(60xx,3000)"
    name: str
    basic: str
    options: dict[str, str]  # option column -> action, only non-empty cells

    def option(self, column: str) -> str:
        """Action of ``column`` for this attribute, "" when the Option leaves it as Basic."""
        return self.options.get(column, "")


@dataclass(frozen=True)
class ProfileTable:
    """The whole table: exact tags and masked repeating-group patterns."""

    exact: dict[int, ProfileRow]
    patterns: tuple[tuple[int, int, ProfileRow], ...]  # (mask, value, row): tag & mask == value

    def __len__(self) -> int:
        return len(self.exact) + len(self.patterns)

    def rows(self) -> list[ProfileRow]:
        return list(self.exact.values()) + [row for _, _, row in self.patterns]


def _parse_tag(text: str) -> tuple[int, int]:
    """'(gggg,eeee)' with 'x' wildcards -> (mask, value)."""
    body = text.strip()
    if not (body.startswith("(") and body.endswith(")") and len(body) == 11 and body[5] == ","):
        raise ValueError(f"{TABLE_FILE}: bad tag {text!r}; expected the form (gggg,eeee)")
    hexdigits = body[1:5] + body[6:10]
    mask = value = 0
    for ch in hexdigits:
        mask <<= 4
        value <<= 4
        if ch in "xX":
            continue
        mask |= 0xF
        value |= int(ch, 16)
    return mask, value


def parse_table(text: str) -> ProfileTable:
    """Parse the TSV text; raise ValueError naming the line for any malformed row."""
    exact: dict[int, ProfileRow] = {}
    patterns: list[tuple[int, int, ProfileRow]] = []
    header: list[str] | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        if header is None:
            header = cells
            expected = ["tag", "name", "basic", *OPTION_COLUMNS]
            if header != expected:
                raise ValueError(f"{TABLE_FILE}:{lineno}: header {header} != {expected}")
            continue
        if len(cells) != len(header):
            raise ValueError(f"{TABLE_FILE}:{lineno}: {len(cells)} cells, expected {len(header)}")
        tag, name, basic, *opts = cells
        if basic not in BASIC_ACTIONS:
            raise ValueError(f"{TABLE_FILE}:{lineno}: unknown Basic Profile action {basic!r}")
        options = {col: act for col, act in zip(OPTION_COLUMNS, opts) if act}
        bad = {a for a in options.values() if a not in OPTION_ACTIONS}
        if bad:
            raise ValueError(f"{TABLE_FILE}:{lineno}: unknown option action(s) {sorted(bad)}")
        row = ProfileRow(tag=tag, name=name, basic=basic, options=options)
        mask, value = _parse_tag(tag)
        if mask == 0xFFFFFFFF:
            if value in exact:
                raise ValueError(f"{TABLE_FILE}:{lineno}: duplicate tag {tag}")
            exact[value] = row
        else:
            patterns.append((mask, value, row))
    return ProfileTable(exact=exact, patterns=tuple(patterns))


@functools.lru_cache(maxsize=1)
def profile_table() -> ProfileTable:
    """The packaged Table E.1-1 (loaded once)."""
    text = resources.files("xrayfm.privacy").joinpath(TABLE_FILE).read_text(encoding="utf-8")
    return parse_table(text)


def lookup(tag: int) -> ProfileRow | None:
    """Row of Table E.1-1 that governs ``tag`` (a 32-bit group<<16|element), or None."""
    table = profile_table()
    row = table.exact.get(tag)
    if row is not None:
        return row
    for mask, value, pattern_row in table.patterns:
        if tag & mask == value:
            return pattern_row
    return None
