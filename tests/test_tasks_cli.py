"""CLI end to end on real project data paths: phantom CT -> synth run -> lake -> heads -> metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from synth_world import heads_world

from xrayfm.cli import main
from xrayfm.lake import read_rows
from xrayfm.models.runtime import resolve_device
from xrayfm.tasks.base import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synth run of 24 images, ingested into a lake, and a random-init resnet18 bundle."""
    return heads_world(tmp_path_factory.mktemp("heads_cli"))


def _common(w: Path) -> list[str]:
    return ["--backbone", str(w / "bb"), "--lake", str(w / "lake"), "--labels", str(w / "synth")]


def test_train_evaluate_embed(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    splits = read_rows(str(world / "lake"), columns=["split"]).column("split").to_pylist()
    assert splits.count("train") >= 8 and splits.count("val") >= 2
    for task in ("classify", "segment", "detect"):
        fraction = ["--label-fraction", "0.5"] if task == "classify" else []
        # detect: the cache holds 8 views of each image, and a stride-2 keypoint grid that
        # evaluate below must decode as such
        dihedral = ["--dihedral", "--out-stride", "2", "--match-px", "12"] if task == "detect" else []
        # segment: a stride-1 mask reading the input image as well (evaluate feeds it the image),
        # trained in fp32 on the CPU named explicitly (the others: auto device and precision)
        fine = ["--out-stride", "1", "--image-skip", "--device", "cpu", "--precision", "fp32"] if task == "segment" else []
        with pytest.raises(SystemExit) as exc:
            main(["heads", "train", "--task", task, *_common(world), "--out", str(world / task),
                  "--epochs", "2", "--img-size", "64", "--batch-size", "8", *fraction, *dihedral, *fine])
        assert exc.value.code == 0
        assert f"trained {task} head" in capsys.readouterr().out
        card = json.loads((world / task / "head.json").read_text())
        assert card["task"] == task and card["backbone"]["arch"] == "resnet18"
        assert card["train_config"]["dihedral"] is bool(dihedral)
        # precision "auto" is saved as what ran: bf16 for the detector where the CPU has fast bf16,
        # fp32 for the pooled region head on the cache (and for segment, asked for fp32)
        fast = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert (card["train_config"]["device"], card["train_config"]["precision"]) == \
            {"segment": ("cpu", "fp32"), "classify": ("auto", "fp32")}.get(task, ("auto", "bf16" if fast else "fp32"))
        ran_on = json.loads((world / task / "run.json").read_text())["device"]
        assert ran_on.split(":")[0] == resolve_device(card["train_config"]["device"]).type
        assert card["head_kwargs"].get("out_stride", 4) == {"detect": 2, "segment": 1}.get(task, 4)
        assert card["head_kwargs"].get("image_skip", False) is (task in ("segment", "detect"))
        assert ("dihedral: true" in (world / task / "config.yaml").read_text()) is bool(dihedral)
        assert (world / task / "config.yaml").is_file() and (world / task / "metrics_val.json").is_file()
        if task == "detect":  # val tuning and metrics at the radius given, kept with the head
            assert card["train_config"]["match_px"] == 12.0
            assert json.loads((world / task / "metrics_val.json").read_text())["max_dist_px"] == 12.0
        if task == "segment":  # the mask threshold is chosen on the val split and kept in the card
            assert card["operating_point"]["split"] == "val" and card["operating_point"]["criterion"] == "dice_mean"
            assert 0.1 <= card["operating_point"]["threshold"] <= 0.95
            assert card["operating_point"]["min_area"] in get_task("segment").MIN_AREA_GRID
        if task == "classify":
            assert "operating_point" not in card
        n_train = json.loads((world / task / "run.json").read_text())["n_train"]
        assert n_train < splits.count("train") if fraction else n_train == splits.count("train")
    out = world / "eval" / "metrics.json"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *_common(world), "--split", "val", "--out", str(out), "--classical", "--device", "cpu",
              *[a for t in ("classify", "segment", "detect") for a in ("--heads", str(world / t))]])
    assert exc.value.code == 0
    doc = json.loads(out.read_text())
    assert set(doc["classification"]) >= {"accuracy", "precision_macro", "recall_macro", "f1_macro",
                                          "top3_accuracy", "knn_accuracy"}
    assert set(doc["classification"]["baselines"]) == {"knn", "pca_svm_features", "pca_svm_pixels"}
    assert set(doc["segmentation"]) >= {"dice_mean", "iou_mean"}
    assert set(doc["detection"]) >= {"precision", "recall", "ap", "head_error_px", "tip_error_px",
                                     "angle_error_deg"}
    assert doc["backbone"] == {"arch": "resnet18", "method": "random", "checkpoint": str(world / "bb")}
    assert 0.0 <= doc["segmentation"]["dice_mean"] <= 1.0
    seg_card = json.loads((world / "segment" / "head.json").read_text())
    assert doc["segmentation"]["threshold"] == seg_card["operating_point"]["threshold"]
    assert doc["segmentation"]["min_area"] == seg_card["operating_point"]["min_area"]
    det_op = json.loads((world / "detect" / "head.json").read_text()).get("operating_point")
    assert doc["detection"]["threshold"] == (det_op["threshold"] if det_op else 0.3)
    assert (world / "eval" / "metrics_run" / "config.yaml").is_file()
    # evaluate scores screws at the head's radius unless told otherwise; a wider one (e.g. for
    # 256-px images) can only match more screws; 0 is refused
    assert doc["detection"]["max_dist_px"] == 12.0
    wide = world / "eval" / "wide.json"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *_common(world), "--split", "val", "--out", str(wide), "--device", "cpu",
              "--heads", str(world / "detect"), "--match-px", "40"])
    assert exc.value.code == 0
    wide_det = json.loads(wide.read_text())["detection"]
    assert wide_det["max_dist_px"] == 40.0 and wide_det["n_matched"] >= doc["detection"]["n_matched"]
    # test-time augmentation: the mirrored copies' maps averaged in, recorded with the metrics
    flipped = world / "eval" / "flip.json"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *_common(world), "--split", "val", "--out", str(flipped), "--device", "cpu",
              "--heads", str(world / "segment"), "--tta", "flip"])
    assert exc.value.code == 0
    flip_doc = json.loads(flipped.read_text())
    assert flip_doc["tta"] == "flip" and doc["tta"] == "none"
    assert flip_doc["segmentation"]["n"] == doc["segmentation"]["n"]
    assert flip_doc["segmentation"]["dice_mean"] != doc["segmentation"]["dice_mean"]  # a random-init
    # backbone and a short-trained head are not mirror-symmetric, so averaging changes the masks
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *_common(world), "--split", "val", "--out", str(world / "eval" / "bad.json"),
              "--heads", str(world / "segment"), "--tta", "rotate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "none, flip, dihedral" in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *_common(world), "--split", "val", "--out", str(world / "eval" / "bad.json"),
              "--heads", str(world / "detect"), "--match-px", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "matching radius" in err[0]
    assert not (world / "eval" / "bad.json").exists()
    emb = world / "emb.parquet"
    with pytest.raises(SystemExit) as exc:
        main(["embed", "--backbone", str(world / "bb"), "--lake", str(world / "lake"), "--out", str(emb)])
    assert exc.value.code == 0
    table = pq.read_table(emb)
    assert table.num_rows == len(splits) and len(table.column("embedding")[0]) == 512
    assert json.loads(table.schema.metadata[b"xrayfm"])["arch"] == "resnet18"


@pytest.mark.parametrize("args, message", [
    (["--task", "dance"], "unknown task 'dance'"),
    (["--task", "segment", "--labels", "/nonexistent/labels.parquet"], "no labels file"),
    (["--task", "segment", "--img-size", "50"], "multiple of 32"),
    (["--task", "classify", "--pool", "max"], "pool must be auto or one of final, multilevel"),
    (["--task", "segment", "--precision", "fp16"], "precision must be one of auto, bf16, fp32"),
    (["--task", "segment", "--device", "tpu"], "device 'tpu' is not a torch device"),
    (["--task", "detect", "--match-px", "0"], "match_px must be a positive distance"),
])
def test_train_bad_input_is_one_line(world: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                     message: str) -> None:
    base = _common(world)
    if "--labels" in args:
        base = base[:4]
    with pytest.raises(SystemExit) as exc:
        main(["heads", "train", *base, *args, "--out", str(world / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0]


def test_pretrain_logs_knn_region_accuracy_each_epoch(world: Path) -> None:
    out = world / "pretrain_knn"
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--lake", str(world / "lake"), "--out", str(out), "--arch", "resnet18", "--epochs", "2",
              "--batch-size", "4", "--global-size", "32", "--local-size", "16", "--n-local", "1",
              "--out-dim", "32", "--num-workers", "0", "--precision", "bf16", "--knn-labels", str(world / "synth")])
    assert exc.value.code == 0
    records = [json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["knn_balanced_accuracy"] <= 1.0 and 0.0 <= r["knn_accuracy"] <= 1.0
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--lake", str(world / "lake"), "--out", str(world / "x"), "--knn-labels",
              str(world / "missing.parquet")])
    assert exc.value.code == 2
