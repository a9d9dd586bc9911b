"""Typed configs: dataclasses loaded from YAML, resolved config written next to outputs.

Every run writes ``config.yaml`` (the resolved config) and ``run.json`` (versions, seed, command
line, time) into its output folder through :func:`write_run_record`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

T = TypeVar("T")
_UMASK = os.umask(0)
os.umask(_UMASK)


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the key and the fix."""


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a plain dict, recursing into nested dataclasses.

    Unknown keys are an error (a typo must not be silently ignored).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(names)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        typ = hints.get(key)
        if isinstance(typ, type) and dataclasses.is_dataclass(typ) and isinstance(value, dict):
            value = from_dict(typ, value, f"{where}.{key}")
        elif typ in (tuple,) or (getattr(typ, "__origin__", None) is tuple and isinstance(value, list)):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def load_yaml(cls: type[T], path: str | os.PathLike[str]) -> T:
    """Load a dataclass config from a YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    return from_dict(cls, data, where=str(p))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain, YAML-serialisable dict (tuples become lists, paths strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(dataclasses.asdict(cfg))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give outputs the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def versions() -> dict[str, str]:
    """Versions of the interpreter and the libraries that decide results (read from package
    metadata, so nothing heavy is imported)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("xrayfm", "numpy", "torch", "timm", "pydicom", "pyarrow", "duckdb"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_run_record(out_dir: str | os.PathLike[str], cfg: Any, seed: int | None = None,
                     extra: dict[str, Any] | None = None, record_command: bool = True) -> None:
    """Write the resolved config (YAML) and versions/seed/command (JSON) into ``out_dir``.

    Pass ``record_command=False`` where the command line may hold patient-identifying paths
    (ingest, anonymize): then only the verb is recorded.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg_dict = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    atomic_write_text(d / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
    record = {
        "command": sys.argv if record_command else sys.argv[:2],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": seed,
        "versions": versions(),
        **(extra or {}),
    }
    atomic_write_text(d / "run.json", json.dumps(record, indent=2, default=str))
