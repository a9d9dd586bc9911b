"""``xrayfm pretrain`` end to end on a lake ingested from real radiographs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from io_testdata import SHARED_XRAY

from xrayfm.cli import main
from xrayfm.models import load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> str:
    data = pytest.importorskip("pydicom.data")
    src = tmp_path_factory.mktemp("src")
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        shutil.copy(data.get_testdata_file(name), src / name)
    if SHARED_XRAY.is_dir():
        for f in SHARED_XRAY.glob("*.png"):
            shutil.copy(f, src / f.name)
    root = tmp_path_factory.mktemp("lake")
    with pytest.raises(SystemExit) as done:
        main(["ingest", str(src), str(root / "lake"), "--key-file", str(root / "k.key"), "--max-side", "64"])
    assert done.value.code == 0
    return str(root / "lake")


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(args)
    return int(done.value.code or 0)


def test_pretrain_cli_trains_resumes_and_exports(lake: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["pretrain", "--lake", lake, "--out", str(out), "--arch", "vit_tiny_patch16", "--split", "all",
            "--epochs", "2", "--batch-size", "2", "--global-size", "32", "--local-size", "16",
            "--n-local", "2", "--out-dim", "64", "--num-workers", "0", "--precision", "fp32",
            "--input-norm", "equalize", "--dense-weight", "0.5"]
    assert _run(args + ["--max-steps", "1"]) == 0
    assert "pretrained 1/" in capsys.readouterr().out
    assert _run(args + ["--resume"]) == 0
    line = capsys.readouterr().out
    assert "resumed from step 1" in line
    card = json.loads((out / "model_card.json").read_text())
    assert card["finished"] and card["training_data"]["lake"] == lake
    assert card["training_data"]["n_images"] >= 2 and card["config"]["arch"] == "vit_tiny_patch16"
    assert card["input_norm"] == "equalize" == card["config"]["input_norm"]
    assert card["config"]["dense_weight"] == 0.5
    assert all("dense_loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    for name in ("config.yaml", "run.json", "metrics.jsonl", "checkpoint.pth"):
        assert (out / name).is_file()
    model, _ = load_backbone(str(out))
    assert model.input_norm == "equalize"
    x = torch.rand(1, 1, 32, 32)
    assert model(x).shape == (1, 192) and torch.allclose(model(x), model(0.5 * x + 0.1), atol=0.01)


def test_pretrain_cli_errors_are_one_line(lake: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    base = ["pretrain", "--lake", lake, "--out", str(tmp_path / "r")]
    cases = [
        (["--arch", "vit_giant"], "unknown arch"),
        (["--precision", "fp8"], "precision"),
        (["--input-norm", "zscore"], "input_norm must be one of fixed, equalize"),
        (["--dense-weight", "-1"], "dense_weight must be >= 0"),
        (["--where", "modality = 'NOPE'", "--split", "all"], "has no images"),
        (["--resume", "--split", "all"], "does not exist"),
        (["--init", str(tmp_path / "missing.pth"), "--arch", "vit_tiny_patch16", "--split", "all"],
         "does not exist"),
    ]
    for extra, message in cases:
        assert _run(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
