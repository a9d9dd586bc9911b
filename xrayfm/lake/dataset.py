"""PyTorch iterable dataset over a lake: filtered, deterministically shuffled, split across ranks.

Every epoch, the selected rows are ordered (row groups in a (seed, epoch) permutation, rows
permuted inside them) and the ordered list is cut into ``world_size * num_workers`` contiguous
ranges that differ in length by at most one row; each (rank, DataLoader worker) reads only its
range, a few row groups at a time, shuffling inside that window. So every selected image is
seen exactly once per epoch across all ranks and workers, and reads stay sequential per row group.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from xrayfm.conventions import from_uint16
from xrayfm.lake.codec import decode_image
from xrayfm.lake.schema import IMAGES_DIR, META_COLUMNS, SPLITS
from xrayfm.lake.writer import LakeError, open_lake

_READ_COLUMNS = ["image", "image_id", "source_pixel_hash"]


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class LakeDataset(IterableDataset):
    """Yields ``{"image": float32 (1, H, W) in [0, 1], "image_id": str, "pixel_hash": str}``.

    ``split`` keeps one of train/val/test, ``where`` is an extra SQL predicate over the metadata
    columns (e.g. ``"modality = 'CR'"``). ``rank``/``world_size`` default to torch.distributed
    when initialised, else the RANK/WORLD_SIZE environment variables, else a single process.
    Call :meth:`set_epoch` before each epoch's iterator is created.
    """

    def __init__(self, lake: str, split: str | None = None, where: str | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, window_row_groups: int = 4) -> None:
        if split is not None and split not in SPLITS:
            raise LakeError(f"unknown split {split!r}; choose one of {list(SPLITS)} or None for all")
        self.loc = open_lake(lake)
        self.split, self.where, self.shuffle, self.seed = split, where, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.window = max(1, window_row_groups)
        self.epoch = 0
        self.files = self.loc.files(IMAGES_DIR)
        self._index = self._build_index()  # (n, 3) int64: file, row group, row inside the group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Rows this rank reads per epoch (all its DataLoader workers together)."""
        rank, world = _world(self.rank, self.world_size)
        n = len(self._index)
        return n * (rank + 1) // world - n * rank // world

    def _filter_columns(self) -> list[str]:
        cols = ["split"] if self.split else []
        if self.where:
            cols += [c for c in META_COLUMNS if re.search(rf"\b{re.escape(c)}\b", self.where)]
        return list(dict.fromkeys(cols)) or ["image_id"]

    def _build_index(self) -> np.ndarray:
        parts: list[np.ndarray] = []
        filt: list[pa.Table] = []
        cols = self._filter_columns() if (self.split or self.where) else None
        for fi, f in enumerate(self.files):
            with self.loc.fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                if cols:
                    t = pf.read(columns=cols)
                    n = t.num_rows
                    filt.append(t.append_column("__file", pa.array(np.full(n, fi), pa.int64()))
                                .append_column("__row", pa.array(np.arange(n), pa.int64())))
            rg = np.repeat(np.arange(len(sizes)), sizes)
            within = np.concatenate([np.arange(s) for s in sizes]) if sizes else np.zeros(0, np.int64)
            parts.append(np.stack([np.full(len(rg), fi), rg, within], axis=1))
        if not parts:
            return np.zeros((0, 3), np.int64)
        index = np.concatenate(parts).astype(np.int64)
        if not cols:
            return index
        offsets = np.cumsum([0] + [len(p) for p in parts])
        conds = [c for c in (f"split = '{self.split}'" if self.split else None,
                             f"({self.where})" if self.where else None) if c]
        con = duckdb.connect()
        try:
            con.register("t", pa.concat_tables(filt))
            keep = con.execute(f"SELECT __file, __row FROM t WHERE {' AND '.join(conds)}").fetchnumpy()
        except duckdb.Error as exc:
            raise LakeError(f"bad LakeDataset filter {self.where!r}: {str(exc).splitlines()[0]}") from exc
        finally:
            con.close()
        return index[np.sort(offsets[keep["__file"]] + keep["__row"])]

    def _epoch_order(self) -> np.ndarray:
        idx = self._index
        if not self.shuffle or len(idx) == 0:
            return idx
        rng = np.random.default_rng([self.seed, self.epoch])
        groups, inverse = np.unique(idx[:, :2], axis=0, return_inverse=True)
        group_rank = rng.permutation(len(groups))[inverse.ravel()]
        return idx[np.lexsort((rng.random(len(idx)), group_rank))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _world(self.rank, self.world_size)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        consumer, consumers = rank * nw + wid, world * nw
        order = self._epoch_order()
        n = len(order)
        mine = order[n * consumer // consumers: n * (consumer + 1) // consumers]
        rng = np.random.default_rng([self.seed, self.epoch, consumer])
        open_files: dict[int, pq.ParquetFile] = {}
        try:
            for window in self._windows(mine):
                rows = self._read_window(window, open_files)
                if self.shuffle:
                    rows = [rows[i] for i in rng.permutation(len(rows))]
                for blob, image_id, phash in rows:
                    img = from_uint16(decode_image(blob))
                    yield {"image": torch.from_numpy(img)[None], "image_id": image_id, "pixel_hash": phash}
        finally:
            for pf in open_files.values():
                pf.close()

    def _windows(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        if len(rows) == 0:
            return
        change = np.flatnonzero(np.any(np.diff(rows[:, :2], axis=0) != 0, axis=1)) + 1
        starts = np.concatenate([[0], change])
        for k in range(0, len(starts), self.window):
            lo = starts[k]
            hi = starts[k + self.window] if k + self.window < len(starts) else len(rows)
            yield rows[lo:hi]

    def _read_window(self, rows: np.ndarray, open_files: dict[int, pq.ParquetFile]) -> list[tuple]:
        out: list[tuple] = []
        keys, starts = np.unique(rows[:, :2], axis=0, return_index=True)
        for fi, rg in keys[np.argsort(starts)]:
            if fi not in open_files:
                open_files[fi] = pq.ParquetFile(self.loc.fs.open(self.files[fi], "rb"))
            t = open_files[fi].read_row_group(int(rg), columns=_READ_COLUMNS)
            sel = rows[(rows[:, 0] == fi) & (rows[:, 1] == rg), 2]
            cols = [t.column(c).take(pa.array(sel)).to_pylist() for c in _READ_COLUMNS]
            out.extend(zip(*cols))
        return out
