"""The image lake: anonymized Parquet shards of encoded X-ray frames, a DuckDB catalog, a loader.

See docs/lake.md. The torch-based :class:`LakeDataset` loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xrayfm.lake.catalog import connect, query, read_rows, stats
from xrayfm.lake.codec import CodecError, decode_image, encode_image, image_sha

# imported eagerly: the function `ingest` shares its name with the submodule, and a lazy lookup
# would let `from xrayfm.lake import ingest` return the module
from xrayfm.lake.ingest import IngestConfig, IngestSummary, ingest
from xrayfm.lake.verify import VerifyReport, verify_lake
from xrayfm.lake.writer import LakeError, open_lake

if TYPE_CHECKING:
    from xrayfm.lake.dataset import LakeDataset

__all__ = ["CodecError", "IngestConfig", "IngestSummary", "LakeDataset", "LakeError", "VerifyReport",
           "connect", "decode_image", "encode_image", "image_sha", "ingest", "open_lake", "query",
           "read_rows", "stats", "verify_lake"]


def __getattr__(name: str) -> Any:
    if name == "LakeDataset":
        from xrayfm.lake.dataset import LakeDataset

        return LakeDataset
    raise AttributeError(f"module 'xrayfm.lake' has no attribute {name!r}")
