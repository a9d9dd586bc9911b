"""``xrayfm anonymize`` end to end on a folder of PHI-laden DICOM files."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from phi_dicom import make_phi_dicom

from xrayfm.cli import main


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0)


@pytest.fixture()
def source(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    src = tmp_path / "incoming" / "Smith John"
    src.mkdir(parents=True)
    study = "1.2.826.0.1.3680043.10.999.7.7"
    planted = [make_phi_dicom(src / f"img{i}.dcm", seed=20 + i, PatientID="PAT-CLI", StudyInstanceUID=study)
               for i in range(3)]
    planted.append(make_phi_dicom(src / "burned.dcm", seed=30, BurnedInAnnotation="YES"))
    (src / "notes.txt").write_text("not a DICOM file")
    return src, planted


def test_anonymize_folder(tmp_path: Path, source: tuple[Path, list[dict[str, str]]],
                          capsys: pytest.CaptureFixture[str]) -> None:
    src, planted = source
    out, key = tmp_path / "anon", tmp_path / "secret" / "k.key"
    assert _run(["anonymize", str(src.parent), "--out", str(out), "--key-file", str(key)]) == 0
    assert "anonymized 3 of 5 files" in capsys.readouterr().out
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 3
    assert len({p.parent.parent for p in written}) == 1  # one patient, one study
    summary = json.loads((out / "anonymize_summary.json").read_text())
    assert summary["written"] == 3 and summary["not_dicom"] == 1
    assert summary["quarantined"] == {"burned_in_annotation": 1}
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == path.parts[-4]
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".json")
    for phi in planted:
        for field, value in phi.items():
            assert value.encode() not in blob, f"{field} leaked"
    first = [p.relative_to(out) for p in written]
    assert _run(["anonymize", str(src), "--out", str(tmp_path / "again"), "--key-file", str(key)]) == 0
    assert sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.dcm")) == first


def test_admit_burned_in(tmp_path: Path, source: tuple[Path, list[dict[str, str]]]) -> None:
    src, _ = source
    out = tmp_path / "anon"
    assert _run(["anonymize", str(src), "--out", str(out), "--key-file", str(tmp_path / "k.key"),
                 "--admit-burned-in", "--retain-dates"]) == 0
    assert len(list(out.rglob("*.dcm"))) == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--safe-private", "nonsense"], "expected CREATOR,GGGG,EE"),
        (["--safe-private", "ACME,0008,01"], "odd group"),
    ],
)
def test_bad_safe_private(tmp_path: Path, source: tuple[Path, list[dict[str, str]]], extra: list[str],
                          message: str, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = source
    code = _run(["anonymize", str(src), "--out", str(tmp_path / "o"), "--key-file", str(tmp_path / "k"), *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_user_errors(tmp_path: Path, source: tuple[Path, list[dict[str, str]]],
                     capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = source
    key = str(tmp_path / "k.key")
    assert _run(["anonymize", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--key-file", key]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run(["anonymize", str(src), "--out", str(src / "out"), "--key-file", key]) == 2
    assert "inside source folder" in capsys.readouterr().err
    out = tmp_path / "o"
    assert _run(["anonymize", str(src), "--out", str(out), "--key-file", str(out / "k.key")]) == 2
    assert "keep the key outside" in capsys.readouterr().err
    bad_key = tmp_path / "bad.key"
    bad_key.write_bytes(b"123")
    bad_key.chmod(0o600)
    assert _run(["anonymize", str(src), "--out", str(out), "--key-file", str(bad_key)]) == 2
    assert "holds 3 bytes" in capsys.readouterr().err
