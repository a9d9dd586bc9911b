"""Lake storage without ingest: codec, atomic shards, catalog, verify and the loader."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from xrayfm.conventions import pixel_hash
from xrayfm.lake import (
    LakeDataset,
    LakeError,
    decode_image,
    encode_image,
    image_sha,
    read_rows,
    stats,
    verify_lake,
)
from xrayfm.lake.codec import CODECS, CodecError, resize_max_side
from xrayfm.lake.schema import IMAGE_SCHEMA, IMAGES_DIR, LAKE_META
from xrayfm.lake.writer import ShardWriter, ensure_lake_meta, open_lake


@pytest.fixture(scope="module")
def ankle() -> np.ndarray:
    """The real 10-bit ankle CR (RG3) at 128 px, as the lake stores images."""
    a = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm")).pixel_array.astype(np.float32)
    img = resize_max_side((a - a.min()) / (a.max() - a.min()), 128)
    return np.round(img * 65535).astype(np.uint16)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_codec_roundtrip_is_lossless_and_compresses(ankle: np.ndarray, codec: str) -> None:
    blob = encode_image(ankle, codec)
    assert np.array_equal(decode_image(blob), ankle)
    assert len(blob) < ankle.nbytes
    odd = ankle[:37, :51].copy()
    assert np.array_equal(decode_image(encode_image(odd, codec)), odd)


def test_codec_rejects_bad_input(ankle: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint16"):
        encode_image(ankle.astype(np.float32))
    with pytest.raises(CodecError, match="header"):
        decode_image(b"PNG" + bytes(20))
    blob = bytearray(encode_image(ankle))
    blob[40] ^= 0xFF
    with pytest.raises(CodecError):
        decode_image(bytes(blob))


def test_resize_keeps_aspect_and_never_upsamples() -> None:
    img = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    assert resize_max_side(img, 150).shape == (150, 100)
    assert resize_max_side(img, 512) is img


def _rows(ankle: np.ndarray, n: int, split_every: int = 3) -> list[dict]:
    """n distinct real-pixel rows (the ankle rolled by i pixels)."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    rows = []
    for i in range(n):
        img = np.roll(ankle, i, axis=1)
        rows.append({
            "image_id": f"img{i:04d}-0", "patient_id": f"p{i // 2}", "study_id": f"s{i}", "series_id": f"r{i}",
            "instance_id": f"img{i:04d}", "frame_index": 0, "num_frames": 1,
            "split": ("train", "val", "test")[i % split_every], "source": "unit", "source_kind": "image",
            "source_pixel_hash": pixel_hash(img), "image": encode_image(img), "image_codec": "zstd-vdelta",
            "image_sha": image_sha(img), "height": img.shape[0], "width": img.shape[1],
            "orig_height": img.shape[0], "orig_width": img.shape[1], "modality": "CR" if i % 2 else "DX",
            "ingest_version": "1", "ingested_at": now,
        })
    return rows


def _make_lake(url: str, ankle: np.ndarray, n: int, per_shard: int = 10) -> list[str]:
    loc = open_lake(url, create=True)
    ensure_lake_meta(loc, 128, "zstd-vdelta")
    w = ShardWriter(loc, IMAGES_DIR, IMAGE_SCHEMA, "n0000of0001-test", rows_per_shard=per_shard, row_group_size=4)
    rows = _rows(ankle, n)
    for r in rows:
        w.add(r)
    w.commit()
    return [r["image_id"] for r in rows]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_shards_catalog_and_stats_on_local_and_fsspec(tmp_path, ankle: np.ndarray, scheme: str) -> None:
    url = f"file://{tmp_path}/lake" if scheme == "file" else f"memory://lake-{os.getpid()}"
    ids = _make_lake(url, ankle, 23)
    loc = open_lake(url)
    assert len(loc.files(IMAGES_DIR)) == 3
    t = read_rows(url, where="split = 'val'", columns=["image_id", "image", "image_sha"])
    assert t.column("image_id").to_pylist() == sorted(i for k, i in enumerate(ids) if k % 3 == 1)
    for blob, sha in zip(t.column("image").to_pylist(), t.column("image_sha").to_pylist()):
        assert image_sha(decode_image(blob)) == sha
    s = stats(url)
    assert s["images"] == 23 and s["shards"] == 3 and s["by_split"] == {"test": 7, "train": 8, "val": 8}
    assert s["by_modality"] == {"CR": 11, "DX": 12} and s["total_bytes"] > 0
    assert "image" not in read_rows(url).column_names


def test_atomic_writes_leave_no_visible_temp(tmp_path, ankle: np.ndarray) -> None:
    _make_lake(str(tmp_path / "lake"), ankle, 5)
    (tmp_path / "lake" / IMAGES_DIR / ".n0000of0001-x-000009.parquet.abc.tmp").write_bytes(b"partial")
    assert stats(str(tmp_path / "lake"))["images"] == 5
    report = verify_lake(str(tmp_path / "lake"))
    assert report.ok and report.images == 5 and report.stale_temp_files == 1


def test_bad_lake_paths_give_one_line_errors(tmp_path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(LakeError, match="is a file") as e:
        open_lake(str(f), create=True)
    assert "\n" not in str(e.value)
    with pytest.raises(LakeError, match="not an xrayfm lake"):
        open_lake(str(tmp_path))
    (tmp_path / "lk").mkdir()
    (tmp_path / "lk" / LAKE_META).write_text('{"format": 1, "max_side": 256, "codec": "zstd-vdelta"}')
    with pytest.raises(LakeError, match="--max-side 256"):
        ensure_lake_meta(open_lake(str(tmp_path / "lk")), 512, "zstd-vdelta")


def test_split_fractions_are_part_of_the_lake(tmp_path) -> None:
    loc = open_lake(str(tmp_path / "lk"), create=True)
    assert ensure_lake_meta(loc, 512, "zstd-vdelta", (0.6, 0.2, 0.2)) == (0.6, 0.2, 0.2)
    assert ensure_lake_meta(loc, 512, "zstd-vdelta") == (0.6, 0.2, 0.2)  # a later ingest inherits them
    with pytest.raises(LakeError, match="--split 0.6,0.2,0.2"):
        ensure_lake_meta(loc, 512, "zstd-vdelta", (0.8, 0.1, 0.1))


def test_verify_detects_a_flipped_byte(tmp_path, ankle: np.ndarray) -> None:
    lake = str(tmp_path / "lake")
    _make_lake(lake, ankle, 12)
    assert verify_lake(lake).ok
    shard = min((tmp_path / "lake" / IMAGES_DIR).glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_lake(lake)
    assert not report.ok and shard.name in report.problems[0]


def _epoch_ids(lake: str, rank: int, epoch: int, shuffle: bool) -> list[str]:
    ds = LakeDataset(lake, shuffle=shuffle, seed=3, rank=rank, world_size=2)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda x: x)
    got = [b["image_id"] for batch in loader for b in batch]
    assert len(got) == len(ds) in (13, 14)
    return got


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_two_ranks_two_workers_see_each_image_once(tmp_path, ankle: np.ndarray, shuffle: bool) -> None:
    lake = str(tmp_path / "lake")
    ids = _make_lake(lake, ankle, 27, per_shard=10)
    epoch1 = [_epoch_ids(lake, rank, 1, shuffle) for rank in range(2)]
    assert sorted(epoch1[0] + epoch1[1]) == sorted(ids)
    assert _epoch_ids(lake, 0, 1, shuffle) == epoch1[0]  # deterministic for (seed, epoch)
    assert (_epoch_ids(lake, 0, 2, shuffle) != epoch1[0]) == shuffle


def test_loader_filters_and_yields_images_in_convention(tmp_path, ankle: np.ndarray, monkeypatch) -> None:
    lake = str(tmp_path / "lake")
    ids = _make_lake(lake, ankle, 12)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    items = list(LakeDataset(lake, split="train", where="modality = 'CR'", seed=0))
    assert sorted(i["image_id"] for i in items) == [ids[k] for k in range(12) if k % 3 == 0 and k % 2 == 1]
    x = items[0]["image"]
    assert x.dtype == torch.float32 and x.shape == (1, *ankle.shape) and 0.0 <= x.min() and x.max() <= 1.0
    assert len(items[0]["pixel_hash"]) == 64
    with pytest.raises(LakeError, match="unknown split"):
        LakeDataset(lake, split="training")
    with pytest.raises(LakeError, match="bad LakeDataset filter"):
        LakeDataset(lake, where="no_such_column = 1")
