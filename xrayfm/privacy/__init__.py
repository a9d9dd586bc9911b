"""De-identification: the PS3.15 Annex E Basic Profile as data, the anonymizer, the key file."""

from xrayfm.privacy.annex_e import ProfileRow, ProfileTable, lookup, profile_table
from xrayfm.privacy.anonymizer import (
    AnonymizationOptions,
    AnonymizationResult,
    Anonymizer,
    PseudoIds,
)
from xrayfm.privacy.keys import KeyFileError, check_key_outside, default_key_path, load_or_create_key

__all__ = [
    "AnonymizationOptions",
    "AnonymizationResult",
    "Anonymizer",
    "KeyFileError",
    "ProfileRow",
    "ProfileTable",
    "PseudoIds",
    "check_key_outside",
    "default_key_path",
    "load_or_create_key",
    "lookup",
    "profile_table",
]
