"""The secret pseudonymisation key: 32 random bytes in a file readable only by its owner.

The same key always yields the same pseudonyms, UIDs and date offsets, which is what links a
patient's studies across ingest runs. Whoever holds the key can re-identify a known patient by
recomputing the pseudonym, so it is kept outside the data it protects (never in the lake) and
losing it means later ingests can no longer be linked to earlier ones.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

KEY_BYTES = 32
KEY_ENV = "XRAYFM_KEY_FILE"


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the file and the fix."""


def default_key_path() -> Path:
    """``$XRAYFM_KEY_FILE`` if set, else ``~/.config/xrayfm/anonymization.key``."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "xrayfm" / "anonymization.key"


def _create_key(path: Path) -> None:
    """Write a fresh key with mode 0600; an existing file (a concurrent creator) is left alone."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and never overwrites a key that appeared meanwhile
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def load_or_create_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """Read the 32-byte key at ``path`` (default :func:`default_key_path`), creating it if absent."""
    p = Path(path).expanduser() if path is not None else default_key_path()
    if p.exists() and not p.is_file():
        raise KeyFileError(f"key file {p} is not a regular file; pass a file path with --key-file")
    if not p.exists():
        try:
            _create_key(p)
        except OSError as exc:
            raise KeyFileError(
                f"cannot create key file {p}: {exc.strerror}; choose a writable path with --key-file"
            ) from exc
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {p} is accessible by other users (mode {stat.filemode(mode)}); run chmod 600 {p}"
        )
    try:
        key = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror}; check its owner and permissions") from exc
    if len(key) != KEY_BYTES:
        raise KeyFileError(
            f"key file {p} holds {len(key)} bytes, expected {KEY_BYTES}; restore the original key "
            "(a new key breaks the link to earlier pseudonyms) or point --key-file at a new path"
        )
    return key


def check_key_outside(key_path: str | os.PathLike[str], *dirs: str | os.PathLike[str]) -> None:
    """Raise KeyFileError if ``key_path`` lies inside any of ``dirs`` (e.g. the lake or output)."""
    key = Path(key_path).expanduser().resolve()
    for d in dirs:
        root = Path(d).expanduser().resolve()
        if key == root or root in key.parents:
            raise KeyFileError(
                f"key file {key} is inside {root}; keep the key outside the data it protects "
                "(use the default ~/.config/xrayfm/anonymization.key or another --key-file)"
            )
