"""Types shared by the decoders: a decoded frame, the decode error, the frame sampling rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DecodedFrame:
    """One 2-D image decoded to the :mod:`xrayfm.conventions` form.

    ``image`` is float32 (H, W) in [0, 1], dense tissue bright. ``raw_hash`` is
    :func:`xrayfm.conventions.pixel_hash` of the frame exactly as the codec decoded it, before
    any intensity mapping. ``meta`` holds technical attributes only and is JSON-serialisable.
    ``source_shape`` is (H, W) as decoded: ``image.shape`` unless the reader was asked to resize.
    """

    image: np.ndarray
    raw_hash: str
    frame_index: int
    num_frames: int
    meta: dict[str, Any]
    source_shape: tuple[int, int]


class DecodeError(Exception):
    """A file or dataset that cannot be decoded to an image.

    ``reason`` is a short machine-readable code (``not_dicom``, ``no_pixel_data``,
    ``unsupported_photometric``, ``unsupported_transfer_syntax``, ``corrupt_pixel_data``,
    ``unreadable_image``...); ``str(exc)`` is one line naming the file and the fix.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(" ".join(message.split()))
        self.reason = reason


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a multi-frame file become images.

    First every ``every``-th frame is kept (0, k, 2k, ...); then, if more than ``max_frames``
    remain, ``max_frames`` of them are taken evenly spread: the one nearest the centre of each of
    ``max_frames`` equal bins (so ``max_frames=1`` picks the middle frame). Frozen, so a shared
    default instance is safe.
    """

    every: int = 1
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"FrameSampling.every must be an integer >= 1, got {self.every!r}")
        if self.max_frames is not None and (
            isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1
        ):
            raise ValueError(
                f"FrameSampling.max_frames must be an integer >= 1 or None, got {self.max_frames!r}"
            )

    def select(self, num_frames: int) -> list[int]:
        """0-based indices of the frames to decode, ascending."""
        kept = list(range(0, max(num_frames, 0), self.every))
        n = self.max_frames
        if n is None or len(kept) <= n:
            return kept
        return [kept[int((i + 0.5) * len(kept) / n)] for i in range(n)]
