"""Ingest DICOM and PNG/JPEG/TIFF files into an anonymized lake: idempotent, crash-safe, parallel.

Idempotent: frames whose ``source_pixel_hash`` is already in the lake (or earlier in this run)
are counted as duplicates and not stored again; a file rejected again for the same reason adds
no second quarantine record. Crash-safe: a shard is committed atomically every
``rows_per_shard`` images, so ``kill -9`` loses only uncommitted work, which a re-run redoes.
Job arrays: node ``shard_index`` of ``num_shards`` takes the files whose stable hash of the
relative path falls on it and names its shards ``n<I>of<N>-<run id>-<seq>.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import posixpath
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from xrayfm.config import ConfigError, atomic_write_text, write_run_record
from xrayfm.io import FrameSampling, retain_freed_memory
from xrayfm.lake.catalog import column_values
from xrayfm.lake.codec import CODECS, DEFAULT_CODEC
from xrayfm.lake.pipeline import FileJob, FileResult, RowContext, process_file
from xrayfm.lake.schema import IMAGE_SCHEMA, IMAGES_DIR, QUARANTINE_DIR, QUARANTINE_SCHEMA, RUNS_DIR
from xrayfm.lake.writer import LakeError, ShardWriter, ensure_lake_meta, open_lake
from xrayfm.privacy import AnonymizationOptions, Anonymizer, load_or_create_key


@dataclass
class IngestConfig:
    """Settings of one ingest run (the resolved copy is written to ``LAKE/_runs/<run id>/``)."""

    key_file: str | None = None           # default: $XRAYFM_KEY_FILE or ~/.config/xrayfm/anonymization.key
    source: str = "default"               # dataset label stored in every row
    max_side: int = 512
    codec: str = DEFAULT_CODEC
    frame_every: int = 1
    max_frames: int | None = None
    apply_voi: bool = False
    retain_device_identity: bool = False
    admit_burned_in: bool = False
    split_fractions: tuple[float, float, float] | None = None  # None: the lake's, else 0.8/0.1/0.1
    workers: int = 1
    shard_index: int = 0
    num_shards: int = 1
    rows_per_shard: int = 256
    row_group_size: int = 32
    report_file: str | None = None        # local JSONL naming rejected files by path (never in the lake)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""
        checks = [
            (self.max_side >= 16, f"max_side must be >= 16, got {self.max_side}"),
            (self.codec in CODECS, f"codec must be one of {sorted(CODECS)}, got {self.codec!r}"),
            (self.frame_every >= 1, f"frame_every must be >= 1, got {self.frame_every}"),
            (self.max_frames is None or self.max_frames >= 1, f"max_frames must be >= 1, got {self.max_frames}"),
            (self.split_fractions is None or (len(self.split_fractions) == 3 and min(self.split_fractions) >= 0
             and abs(sum(self.split_fractions) - 1) < 1e-6),
             f"split_fractions must be 3 non-negative numbers summing to 1, got {self.split_fractions}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.num_shards >= 1 and 0 <= self.shard_index < self.num_shards,
             f"shard_index must be in [0, num_shards), got {self.shard_index} of {self.num_shards}"),
            (self.rows_per_shard >= 1 and self.row_group_size >= 1, "rows_per_shard and row_group_size must be >= 1"),
            (bool(self.source.strip()), "source must be a non-empty label"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


@dataclass
class IngestSummary:
    """Counts of one ingest run; ``files == ingested_files + duplicate_files + rejected + skipped``."""

    run_id: str
    files: int = 0
    ingested: int = 0          # frames stored
    ingested_files: int = 0    # files that stored at least one frame
    duplicates: int = 0        # frames already in the lake (or seen earlier in this run)
    duplicate_files: int = 0   # files all of whose frames were duplicates
    rejected: dict[str, int] = field(default_factory=dict)
    skipped: int = 0           # files that are neither DICOM nor a known image type
    shards: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rej = sum(self.rejected.values())
        why = f" ({', '.join(f'{k} {v}' for k, v in sorted(self.rejected.items()))})" if rej else ""
        return (f"ingested {self.ingested} images from {self.files} files, {self.duplicates} duplicates, "
                f"rejected {rej}{why}, skipped {self.skipped} non-image files, "
                f"{self.shards} shards in {self.seconds:.1f} s")


def _node_of(rel: str, num_shards: int) -> int:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) % num_shards


def list_jobs(sources: list[str], shard_index: int = 0, num_shards: int = 1) -> list[FileJob]:
    """Files under ``sources`` (sorted; hidden files skipped) that belong to this node."""
    jobs: list[FileJob] = []
    for s in sources:
        p = Path(s)
        if not p.exists():
            raise LakeError(f"source path {s} does not exist; pass an existing file or folder")
        if p.is_file():
            pairs = [(p, p.name)]
        else:
            pairs = [(f, f.relative_to(p).as_posix()) for f in sorted(p.rglob("*"))
                     if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        jobs.extend(FileJob(str(f), rel) for f, rel in pairs if _node_of(rel, num_shards) == shard_index)
    return jobs


_W: dict[str, object] = {}


def _init_worker(key: bytes, options: AnonymizationOptions, ctx: RowContext, known: frozenset[str]) -> None:
    _W.update(anon=Anonymizer(key, options), ctx=ctx, known=known)


def single_core_process() -> None:
    """Tune a process that only ingests: keep freed heap (no re-faulting ~40 MB per radiograph)
    and one OpenCV thread (parallelism comes from ``--workers``; OpenCV's own threads only add
    CPU time per image)."""
    import cv2

    retain_freed_memory()
    cv2.setNumThreads(1)


def _init_own_process(*args: object) -> None:
    single_core_process()  # a worker process is ours
    _init_worker(*args)  # type: ignore[arg-type]


def _work(job: FileJob) -> FileResult:
    return process_file(job, _W["anon"], _W["ctx"], _W["known"])  # type: ignore[arg-type]


def _results(jobs: list[FileJob], cfg: IngestConfig, init_args: tuple) -> Iterator[FileResult]:
    """Results in job order; at most ``4 * workers`` files in flight, so memory stays flat."""
    if cfg.workers == 1:
        _init_worker(*init_args)
        yield from map(_work, jobs)
        return
    # spawn: forking a process that holds pyarrow/zstd thread pools can deadlock; the executor
    # (unlike multiprocessing.Pool) fails loudly when a worker dies instead of hanging.
    with ProcessPoolExecutor(cfg.workers, mp.get_context("spawn"), _init_own_process, init_args) as pool:
        pending: deque[Future[FileResult]] = deque()
        todo = iter(jobs)
        for job in todo:
            pending.append(pool.submit(_work, job))
            if len(pending) >= 4 * cfg.workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_work, nxt))
            yield result


def _redacted_command(sources: list[str]) -> list[str]:
    names = {str(Path(s)): i for i, s in enumerate(sources)} | {str(Path(s).resolve()): i for i, s in enumerate(sources)}
    return [f"<source {names[a]}>" if a in names else a for a in sys.argv]


def _write_record(loc, run_id: str, cfg: IngestConfig, summary: IngestSummary, sources: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_run_record(tmp, cfg, extra={"run_id": run_id, "summary": asdict(summary)})
        record = json.loads(Path(tmp, "run.json").read_text())
        record["command"] = _redacted_command(sources)  # source paths can carry PHI
        loc.put_atomic(posixpath.join(RUNS_DIR, run_id, "run.json"), json.dumps(record, indent=2).encode())
        loc.put_atomic(posixpath.join(RUNS_DIR, run_id, "config.yaml"), Path(tmp, "config.yaml").read_bytes())
    loc.put_atomic(posixpath.join(RUNS_DIR, run_id, "summary.json"), json.dumps(asdict(summary), indent=2).encode())


def ingest(sources: list[str], lake: str, config: IngestConfig | None = None,
           progress: Callable[[int, int], None] | None = None) -> IngestSummary:
    """Ingest ``sources`` (files or folders) into ``lake``; ``progress(done, total)`` per file."""
    cfg = config or IngestConfig()
    cfg.validate()
    if not sources:
        raise LakeError("no source given; pass at least one file or folder to ingest")
    t0 = time.perf_counter()
    jobs = list_jobs(sources, cfg.shard_index, cfg.num_shards)
    key = load_or_create_key(cfg.key_file)
    loc = open_lake(lake, create=True)
    fractions = ensure_lake_meta(loc, cfg.max_side, cfg.codec, cfg.split_fractions)
    known = {v for (v,) in column_values(loc, IMAGES_DIR, ["source_pixel_hash"])}
    recorded = set(column_values(loc, QUARANTINE_DIR, ["path_key", "reason"]))
    started = datetime.now(timezone.utc).replace(microsecond=0)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    prefix = f"n{cfg.shard_index:04d}of{cfg.num_shards:04d}-{run_id}"
    images = ShardWriter(loc, IMAGES_DIR, IMAGE_SCHEMA, prefix, cfg.rows_per_shard, cfg.row_group_size)
    quarantine = ShardWriter(loc, QUARANTINE_DIR, QUARANTINE_SCHEMA, prefix, cfg.rows_per_shard)
    options = AnonymizationOptions(retain_device_identity=cfg.retain_device_identity,
                                   admit_burned_in=cfg.admit_burned_in)
    ctx = RowContext(cfg.max_side, cfg.codec, FrameSampling(cfg.frame_every, cfg.max_frames), cfg.apply_voi,
                     cfg.retain_device_identity, cfg.source, fractions, started)
    summary = IngestSummary(run_id=run_id, files=len(jobs))
    rejected: Counter[str] = Counter()
    report_lines: list[str] = []
    for done, (job, res) in enumerate(zip(jobs, _results(jobs, cfg, (key, options, ctx, frozenset(known)))), 1):
        if res.skipped:
            summary.skipped += 1
        elif res.quarantine is not None:
            q = res.quarantine
            rejected[q["reason"]] += 1
            report_lines.append(json.dumps({"path": job.rel, "reason": q["reason"], "message": res.detail}))
            if (q["path_key"], q["reason"]) not in recorded:
                recorded.add((q["path_key"], q["reason"]))
                quarantine.add(q)
        else:
            stored = 0
            for row in res.rows:
                if row["source_pixel_hash"] in known:
                    res.duplicates += 1
                    continue
                known.add(row["source_pixel_hash"])
                images.add(row)
                stored += 1
            summary.ingested += stored
            summary.duplicates += res.duplicates
            summary.ingested_files += stored > 0
            summary.duplicate_files += stored == 0
        if progress:
            progress(done, len(jobs))
    images.commit()
    quarantine.commit()
    summary.rejected = dict(rejected)
    summary.shards = len(images.committed_files)
    summary.seconds = round(time.perf_counter() - t0, 3)
    if cfg.report_file:
        atomic_write_text(cfg.report_file, "".join(line + "\n" for line in report_lines))
    _write_record(loc, run_id, cfg, summary, sources)
    return summary
