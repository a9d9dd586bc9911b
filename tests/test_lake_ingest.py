"""Ingest on real files: accounting, PHI, pseudonyms, idempotency, kill -9, job arrays, CLI errors."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from xrayfm.cli import main
from xrayfm.conventions import pixel_hash
from xrayfm.lake import LakeError, read_rows, stats, verify_lake
from xrayfm.lake.ingest import IngestConfig, ingest
from xrayfm.lake.schema import IMAGES_DIR
from xrayfm.privacy import load_or_create_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phi_dicom import make_phi_dicom

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPO = Path(__file__).resolve().parents[1]
# pydicom's own test files of many kinds: plain, compressed, multi-frame, colour, no pixel data.
PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "emri_small.dcm", "rtplan.dcm", "SC_rgb.dcm",
                 "ExplVR_BigEnd.dcm", "MR_small_RLE.dcm", "image_dfl.dcm", "OBXXXX1A.dcm"]
PYDICOM_DATA_FILES = ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm"]


def _cfg(tmp: Path, key: str = "k1", **kw) -> IngestConfig:
    load_or_create_key(tmp / f"{key}.key")
    return IngestConfig(key_file=str(tmp / f"{key}.key"), max_side=kw.pop("max_side", 128), **kw)


@pytest.fixture(scope="module")
def real_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("real")
    for name in PYDICOM_FILES + PYDICOM_DATA_FILES:
        p = get_testdata_file(name)
        if p is None:
            pytest.skip(f"pydicom test file {name} is missing; install pydicom-data (pip install pydicom-data)")
        shutil.copy(p, src / name)
    (src / "notes.txt").write_text("not an image")
    (src / "truncated.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:3000])
    if (SHARED / "data" / "xray").is_dir():
        shutil.copytree(SHARED / "data" / "xray", src / "shared_xray")
    return src


def test_real_files_are_ingested_or_quarantined_and_counts_add_up(real_src: Path, tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    report = tmp_path / "rejected.jsonl"
    s = ingest([str(real_src)], lake, _cfg(tmp_path, report_file=str(report)))
    n_files = sum(1 for p in real_src.rglob("*") if p.is_file())
    assert s.files == n_files
    assert s.ingested_files + s.duplicate_files + sum(s.rejected.values()) + s.skipped == n_files
    assert s.skipped == 1
    rows = read_rows(lake)
    assert rows.num_rows == s.ingested and len(set(rows.column("image_id").to_pylist())) == s.ingested
    hashes = set(rows.column("source_pixel_hash").to_pylist())
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):  # the real radiographs are in, matched by source hash
        assert pixel_hash(pydicom.dcmread(real_src / name).pixel_array) in hashes
    assert s.duplicates >= 1  # RG3_J2KR holds the same pixels as RG3_UNCR
    assert max(rows.column("height").to_pylist() + rows.column("width").to_pylist()) == 128
    assert rows.num_rows >= 10 + len(PYDICOM_DATA_FILES) - 1  # emri_small alone has 10 frames
    rejected = report.read_text().splitlines()
    assert len(rejected) == sum(s.rejected.values()) >= 2  # no pixel data, truncated
    st = stats(lake)
    assert st["images"] == s.ingested and sum(st["rejected_by_reason"].values()) == len(rejected)
    assert set(st["by_split"]) <= {"train", "val", "test"}
    if (SHARED / "data" / "xray").is_dir():
        assert "image" in read_rows(lake, columns=["source_kind"]).column("source_kind").to_pylist()
    assert verify_lake(lake).ok
    again = ingest([str(real_src)], lake, _cfg(tmp_path))  # idempotent
    assert again.ingested == 0 and again.duplicates == s.ingested + s.duplicates
    assert stats(lake)["rejected_by_reason"] == st["rejected_by_reason"]


def _all_lake_text(lake: Path) -> tuple[bytes, str]:
    """Raw bytes of every file under the lake, and every value of every Parquet row as text."""
    raw, values = b"", []
    for f in sorted(lake.rglob("*")):
        if f.is_file():
            raw += f.read_bytes()
            if f.suffix == ".parquet":
                t = pq.read_table(f)
                values += [repr(v) for col in t.columns for v in col.to_pylist()]
    return raw, "\n".join(values)


def test_no_planted_phi_anywhere_and_pseudonyms_are_keyed(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    planted: dict[str, str] = {}
    for seed in range(3):
        phi = make_phi_dicom(src / f"p{seed}.dcm", seed=seed)
        ds = pydicom.dcmread(src / f"p{seed}.dcm")
        arr = ds.pixel_array.copy()
        arr[0, :seed] += 1  # distinct pixels per patient so no file is a duplicate
        ds.PixelData = arr.tobytes()
        # the path itself carries PHI too; the lake must not store it
        ds.save_as(src / f"{phi['PatientName.family']}_{seed}.dcm")
        (src / f"p{seed}.dcm").unlink()
        planted.update({f"{k}#{seed}": v for k, v in phi.items()})
    burned = make_phi_dicom(src / "burned_in.dcm", seed=7, BurnedInAnnotation="YES")
    os.rename(src / "burned_in.dcm", src / f"{burned['PatientName.family']}.dcm")
    planted.update({f"{k}#7": v for k, v in burned.items()})
    load_or_create_key(tmp_path / "k1.key")
    load_or_create_key(tmp_path / "k2.key")
    lakes = {}
    for name, key in (("a", "k1"), ("b", "k1"), ("c", "k2")):
        lakes[name] = tmp_path / f"lake_{name}"
        with pytest.raises(SystemExit) as e:
            main(["ingest", str(src), str(lakes[name]), "--key-file", str(tmp_path / f"{key}.key"),
                  "--max-side", "64", "--source", "phi-test"])
        assert e.value.code in (0, None)
    out = capsys.readouterr()
    assert "ingested 3 images from 4 files" in out.out and "burned_in_annotation 1" in out.out
    for lake in lakes.values():
        raw, text = _all_lake_text(lake)
        for field, value in planted.items():
            assert value.encode() not in raw, f"planted {field} found in the bytes of {lake}"
            assert value not in text, f"planted {field} found in a Parquet value of {lake}"
            assert value not in out.out + out.err, f"planted {field} printed"
    ids = {k: read_rows(str(v), columns=["image_id", "patient_id", "study_id"]).to_pylist()
           for k, v in lakes.items()}
    assert ids["a"] == ids["b"] and len(ids["a"]) == 3
    assert not {r["patient_id"] for r in ids["a"]} & {r["patient_id"] for r in ids["c"]}
    assert not {r["image_id"] for r in ids["a"]} & {r["image_id"] for r in ids["c"]}


@pytest.fixture(scope="module")
def many_src(tmp_path_factory) -> Path:
    """300 small real-pixel DICOMs: pydicom's CT_small with one pixel changed per file."""
    src = tmp_path_factory.mktemp("many")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = ds.pixel_array.copy()
    for i in range(300):
        arr = base.copy()
        arr.flat[i] = arr.flat[i] + 1 if arr.flat[i] < 2000 else arr.flat[i] - 1
        ds.PixelData = arr.tobytes()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1.{i + 1}"
        ds.save_as(src / f"im{i:03d}.dcm")
    return src


def test_kill_9_midway_then_rerun_equals_uninterrupted(many_src: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_side=32)
    ref = tmp_path / "ref"
    assert ingest([str(many_src)], str(ref), dataclasses.replace(cfg, workers=2)).ingested == 300
    lake = tmp_path / "lake"
    cmd = [sys.executable, "-c", "from xrayfm.cli import main; main()", "ingest", str(many_src), str(lake),
           "--key-file", cfg.key_file, "--max-side", "32", "--rows-per-shard", "16"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((lake / IMAGES_DIR).glob("*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "ingest finished before it could be killed; give it more files"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_rows(str(lake), columns=["image_id"]).num_rows
    assert 16 <= partial < 300 and partial % 16 == 0  # only whole committed shards are visible
    resumed = ingest([str(many_src)], str(lake), cfg)
    assert resumed.ingested == 300 - partial and resumed.duplicates == partial
    got = read_rows(str(lake), columns=["image_id", "image_sha"]).to_pylist()
    want = read_rows(str(ref), columns=["image_id", "image_sha"]).to_pylist()
    assert got == want
    assert verify_lake(str(lake)).ok


def test_job_array_nodes_partition_the_files(many_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(many_src.glob("*.dcm"))[:40]:
        os.symlink(f, src / f.name)
    lake = tmp_path / "lake"
    parts = [ingest([str(src)], str(lake), _cfg(tmp_path, max_side=32, shard_index=i, num_shards=3))
             for i in range(3)]
    assert sum(p.files for p in parts) == 40 and all(p.files > 0 for p in parts)
    names = [f.name for f in (lake / IMAGES_DIR).glob("*.parquet")]
    assert len(names) == 3 and {n[:12] for n in names} == {f"n{i:04d}of0003-" for i in range(3)}
    single = ingest([str(src)], str(tmp_path / "single"), _cfg(tmp_path, max_side=32))
    assert read_rows(str(lake), columns=["image_id"]) == read_rows(str(tmp_path / "single"), columns=["image_id"])
    assert single.ingested == 40


def test_bad_inputs_give_one_line_errors(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(LakeError, match="does not exist"):
        ingest([str(tmp_path / "missing")], str(tmp_path / "lake"), _cfg(tmp_path))
    for argv, needle in ((["ingest", str(tmp_path / "missing"), str(tmp_path / "lake")], "does not exist"),
                         (["ingest", str(afile), str(afile)], "is a file"),
                         (["ingest", str(afile), str(tmp_path / "l2"), "--max-side", "3"], "max_side"),
                         (["lake", "stats", str(tmp_path)], "not an xrayfm lake")):
        with pytest.raises(SystemExit) as e:
            main(argv + (["--key-file", str(tmp_path / "k1.key")] if argv[0] == "ingest" else []))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)


def test_lake_cli_query_show_verify(many_src: Path, tmp_path: Path, capsys) -> None:
    lake = tmp_path / "lake"
    ingest([str(p) for p in sorted(many_src.glob("*.dcm"))[:5]], str(lake), _cfg(tmp_path, max_side=48))
    with pytest.raises(SystemExit):
        main(["lake", "query", str(lake), "SELECT split, count(*) AS n FROM images GROUP BY 1"])
    assert "rows" in capsys.readouterr().out
    image_id = read_rows(str(lake), columns=["image_id"]).column("image_id")[0].as_py()
    with pytest.raises(SystemExit):
        main(["lake", "show", str(lake), image_id, "--out", str(tmp_path / "x.png")])
    import cv2

    png = cv2.imread(str(tmp_path / "x.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and max(png.shape) == 48
    with pytest.raises(SystemExit) as e:
        main(["lake", "verify", str(lake)])
    assert e.value.code in (0, None) and "OK" in capsys.readouterr().out
    shard = next((lake / IMAGES_DIR).glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main(["lake", "verify", str(lake)])
    assert e.value.code == 1 and "DAMAGED" in capsys.readouterr().out
