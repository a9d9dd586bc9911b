"""Projected vertebra masks: synth geometry, labels.parquet column, task data path, segment_vertebrae."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from synth_world import heads_world, phantom_ct_files

from xrayfm.synth.anatomy import find_vertebrae, group_points
from xrayfm.synth.generate import SynthConfig, collect_parts, generate
from xrayfm.synth.geometry import View, field_mask, project, projection_matrix
from xrayfm.synth.labels import decode_mask, read_labels, write_labels
from xrayfm.synth.phantom import make_phantom
from xrayfm.synth.physics import Exposure
from xrayfm.synth.render import prepare_volume
from xrayfm.synth.scene import Scene, render_scene, vertebra_volume
from xrayfm.tasks.base import get_task
from xrayfm.tasks.data import LabeledImage, augment_item, hflip_item, resize_item
from xrayfm.tasks.metrics import dice
from xrayfm.tasks.train import HeadTrainConfig, predict_items, train_head

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom() -> tuple:
    vol = make_phantom(voxel_mm=3.0)
    pv = prepare_volume(vol, voxel_mm=3.0)
    verts = find_vertebrae(vol)
    scene = Scene(pv, group_points(vol), [], "lumbar_spine", verts, vertebra_volume(vol, pv))
    return vol, scene


def _render(scene: Scene, view: View, seed: int = 0):
    return render_scene(scene, view, Exposure(), np.random.default_rng(seed))


def test_ap_view_mask_covers_vertebral_bodies_at_their_width(phantom: tuple) -> None:
    _, scene = phantom
    v = scene.vertebrae[2]
    view = View(isocenter=tuple(v.body_center), size=128, field_mm=200.0)
    m = _render(scene, view).vertebra_mask
    assert m is not None and m.dtype == bool and m.shape == (128, 128)
    inside = field_mask(view) > 0.5
    assert m.any() and not (m & ~inside).any()  # only inside the detector field
    p = projection_matrix(view)
    checked = 0
    for vert in scene.vertebrae:
        x, y = project(p, vert.body_center[None])[0]
        if 0 <= x < 128 and 0 <= y < 128 and inside[int(y), int(x)]:
            assert m[int(y), int(x)], vert.name
            checked += 1
    assert checked >= 3
    x, y = (int(c) for c in project(p, v.body_center[None])[0])
    # the phantom's vertebral body is 44 mm wide (x radius 22 mm) and sits at the isocentre
    width_mm = m[y].sum() * view.iso_pixel_mm
    assert 40.0 < width_mm < 54.0, width_mm
    # 12 mm discs between 28 mm vertebrae: some rows on the central column are not vertebra
    assert 0.4 < m[:, x][inside[:, x]].mean() < 0.95


def test_view_beside_the_spine_and_unlabelled_volume_give_no_vertebra(phantom: tuple) -> None:
    vol, scene = phantom
    lung = scene.group_points["lung"].mean(0) + np.array([60.0, 0.0, 0.0])
    away = View(isocenter=tuple(lung), size=64, field_mm=90.0)
    m = _render(scene, away).vertebra_mask
    assert m is not None and not m.any()
    spine_ids = [i for i, n in vol.label_names.items() if n.startswith("vertebrae_")]
    no_spine = np.where(np.isin(vol.labels, spine_ids), 0, vol.labels).astype(vol.labels.dtype)
    assert vertebra_volume(replace(vol, labels=no_spine), scene.volume) is None
    assert vertebra_volume(replace(vol, labels=None, label_names={}), scene.volume) is None
    bare = replace(scene, vertebra_volume=None)
    assert _render(bare, View(isocenter=tuple(scene.vertebrae[0].body_center), size=64)).vertebra_mask is None


def test_synth_run_stores_vertebrae_png_and_old_files_still_load(tmp_path: Path) -> None:
    ct, seg = phantom_ct_files(tmp_path)
    out = tmp_path / "run"
    generate(SynthConfig(out=str(out), ct=str(ct), labels=str(seg), n=4, size=64, seed=2, screws=(2, 2),
                         images_per_study=2, voxel_mm=3.0))
    labels = read_labels(out / "labels.parquet")
    assert all(lb.vertebra_mask is not None and lb.vertebra_mask.shape == (64, 64) for lb in labels)
    assert sum(bool(lb.vertebra_mask.any()) for lb in labels) >= 2  # type: ignore[union-attr]
    table = pq.read_table(out / "labels.parquet")
    assert table.column_names[-1] == "vertebrae_png"
    # a labels file written before the column existed
    pq.write_table(table.drop(["vertebrae_png"]), tmp_path / "old.parquet")
    old = read_labels(tmp_path / "old.parquet")
    assert [lb.pixel_hash for lb in old] == [lb.pixel_hash for lb in labels]
    assert all(lb.vertebra_mask is None for lb in old)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(old, labels))
    # None survives a write/read round trip; a label part from before the key exists reads as None
    write_labels(tmp_path / "none.parquet", old)
    assert all(lb.vertebra_mask is None for lb in read_labels(tmp_path / "none.parquet"))
    part_path = out / ".parts" / "000000.json"
    part = json.loads(part_path.read_text())
    assert np.array_equal(decode_mask(base64.b64decode(part.pop("vertebrae_png"))), labels[0].vertebra_mask)
    part_path.write_text(json.dumps(part))
    assert collect_parts(out, 4)[0].vertebra_mask is None


def _item(seed: int, size: int = 64) -> LabeledImage:
    """An image whose bright pixels are exactly an asymmetric bone mask plus a small metal bar."""
    rng = np.random.default_rng(seed)
    bone = np.zeros((size, size), dtype=bool)
    x0, y0 = (int(v) for v in rng.integers(4, size // 3, 2))
    bone[y0:y0 + size // 2, x0:x0 + size // 6] = True           # an L: flips are visible
    bone[y0 + size // 2 - 6:y0 + size // 2, x0:x0 + size // 2] = True
    metal = np.zeros_like(bone)
    metal[size - 12:size - 6, size - 20:size - 4] = True
    img = np.where(bone, 0.7, 0.2).astype(np.float32)
    img[metal] = 0.95
    return LabeledImage(image=img, image_id=f"l{seed}", mask=metal, bone_mask=bone)


def test_resize_augment_flip_keep_bone_mask_on_its_pixels() -> None:
    item = _item(0)

    def aligned(it: LabeledImage) -> None:
        assert it.bone_mask is not None and it.bone_mask.shape == it.size
        bone_px = (it.image > 0.45) & (it.image < 0.825)  # midpoints of the levels
        assert dice(it.bone_mask & ~it.mask, bone_px) > 0.9  # type: ignore[operator]
        assert dice(it.mask, it.image >= 0.825) > 0.9

    flipped = hflip_item(item)
    assert np.array_equal(flipped.bone_mask, item.bone_mask[:, ::-1])  # type: ignore[index]
    assert not np.array_equal(flipped.bone_mask, item.bone_mask)
    aligned(flipped)
    for size in (32, 96):
        aligned(resize_item(item, size))
    rng = np.random.default_rng(3)
    for _ in range(6):
        aligned(augment_item(item, rng, min_scale=0.6))
    assert resize_item(LabeledImage(image=item.image, image_id="x"), 32).bone_mask is None


def test_segment_vertebrae_head_learns_rendered_vertebrae(phantom: tuple, tmp_path: Path) -> None:
    from xrayfm.models import create_backbone

    _, scene = phantom
    rng = np.random.default_rng(7)
    items = []
    for i in range(20):
        v = scene.vertebrae[int(rng.integers(len(scene.vertebrae)))]
        centre = v.body_center + rng.normal(0.0, 25.0, 3)
        view = View(isocenter=tuple(centre), size=64, lao_deg=float(rng.uniform(-40, 40)),
                    cran_deg=float(rng.uniform(-10, 10)), field_mm=float(rng.choice([170.0, 230.0])))
        r = _render(scene, view, i)
        items.append(LabeledImage(image=r.image, image_id=f"v{i}", mask=r.mask, bone_mask=r.vertebra_mask))
    train, test = items[:14], items[14:]
    assert all(it.bone_mask is not None and it.bone_mask.any() for it in test)
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", img_size=64).eval()
    task = get_task("segment_vertebrae")
    assert task.has_label(train[0]) and not task.has_label(LabeledImage(image=train[0].image, image_id="u"))
    cfg = HeadTrainConfig(task="segment_vertebrae", img_size=64, epochs=15, batch_size=8, lr=1e-2,
                          head_width=32)
    head, history = train_head(backbone, train, cfg)
    assert history[-1]["loss"] < history[0]["loss"]
    m = task.metrics(predict_items(backbone, head, task, test, 64), test)
    everything = task.metrics([np.ones(it.size, dtype=bool) for it in test], test)["dice_mean"]
    # measured: Dice 0.74 against 0.33 for predicting every pixel
    assert m["n"] == len(test) and m["dice_mean"] > max(0.5, everything + 0.1), (m["dice_mean"], everything)


def test_cli_trains_and_evaluates_segment_vertebrae(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from xrayfm.cli import main

    heads_world(tmp_path)
    common = ["--backbone", str(tmp_path / "bb"), "--lake", str(tmp_path / "lake"),
              "--labels", str(tmp_path / "synth")]
    head_dir = tmp_path / "vert"
    with pytest.raises(SystemExit) as exc:
        main(["heads", "train", "--task", "segment_vertebrae", *common, "--out", str(head_dir),
              "--epochs", "2", "--img-size", "64", "--batch-size", "8"])
    assert exc.value.code == 0
    assert "trained segment_vertebrae head seg_decoder" in capsys.readouterr().out
    assert json.loads((head_dir / "head.json").read_text())["task"] == "segment_vertebrae"
    out = tmp_path / "metrics.json"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *common, "--split", "val", "--out", str(out), "--heads", str(head_dir)])
    assert exc.value.code == 0
    assert "vertebrae_segmentation dice_mean" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["heads"] == {"segment_vertebrae": str(head_dir)} and "segmentation" not in doc
    section = doc["vertebrae_segmentation"]
    assert 0.0 <= section["dice_mean"] <= 1.0 and section["n"] >= 1
