"""The key file: created once with mode 0600, reused, and refused with a clear message when unusable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from xrayfm.privacy import KeyFileError, check_key_outside, default_key_path, load_or_create_key


def test_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "anonymization.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert load_or_create_key(tmp_path / "other.key") != key
    assert [p.name for p in path.parent.iterdir()] == ["anonymization.key"]  # no temporary left behind


def test_default_path_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XRAYFM_KEY_FILE", str(tmp_path / "env.key"))
    assert default_key_path() == tmp_path / "env.key"
    key = load_or_create_key()
    assert (tmp_path / "env.key").read_bytes() == key
    monkeypatch.delenv("XRAYFM_KEY_FILE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_key_path() == tmp_path / "home" / ".config" / "xrayfm" / "anonymization.key"


def test_wrong_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(b"x" * 31)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="holds 31 bytes, expected 32"):
        load_or_create_key(path)


def test_open_permissions_and_directories_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "open.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_key(path)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_key(tmp_path)


def test_key_must_live_outside_the_data(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    check_key_outside(tmp_path / "keys" / "k.key", lake)
    with pytest.raises(KeyFileError, match="inside"):
        check_key_outside(lake / "sub" / "k.key", tmp_path / "elsewhere", lake)


def test_uncreatable_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(KeyFileError, match="cannot create key file"):
        load_or_create_key(blocker / "k.key")
