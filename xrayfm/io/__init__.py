"""Decoding real X-ray images (DICOM, PNG, JPEG, TIFF) to the :mod:`xrayfm.conventions` form.

CT volumes live in :mod:`xrayfm.io.volume`.
"""

from xrayfm.io.alloc import retain_freed_memory
from xrayfm.io.dicom import is_dicom, read_dicom_frames
from xrayfm.io.frames import DecodedFrame, DecodeError, FrameSampling
from xrayfm.io.images import image_format, read_any, read_image_file

__all__ = [
    "DecodeError",
    "DecodedFrame",
    "FrameSampling",
    "image_format",
    "is_dicom",
    "read_any",
    "read_dicom_frames",
    "read_image_file",
    "retain_freed_memory",
]
