"""One rectangle of a JPEG, decoded by libjpeg-turbo without the IDCT of the rest (``jpeg_region.c``).

A random resized crop keeps about half of a photo; decoding all of it only to crop spends the
IDCT, chroma upsampling and colour conversion of the other half. libjpeg-turbo's partial
decoding (``jpeg_skip_scanlines``, ``jpeg_crop_scanline``) skips those stages outside the
rectangle, and the pixels inside are the ones a full decode gives (tested against Pillow's, at
full and at 1/2, 1/4, 1/8 scale, for 4:4:4, 4:2:2, 4:2:0, progressive and greyscale files; rarer
sampling layouts are declined and decoded whole).

Neither Pillow nor torchvision exposes it, so the 100 lines of C are compiled on first use
(``data/native.py``) against the system's libjpeg-turbo headers (Debian: ``libjpeg62-turbo-dev``)
and called through ctypes. Where that cannot be done (no compiler, no headers, a libjpeg without
partial decoding) ``region_decoder()`` is None, one log line says why, and callers decode whole
images as before.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

from .native import native_library

SOURCE = Path(__file__).with_name("jpeg_region.c")
# Return codes of jpeg_region_decode (jpeg_region.c).
REGION_OK = 0


@functools.cache
def region_decoder() -> ctypes.CDLL | None:
    """The loaded library (built first if its file is missing), or None where it cannot be had."""
    lib = native_library(SOURCE, ("jpeg",), "partial JPEG decoding; whole images are decoded instead")
    if lib is not None:
        lib.jpeg_region_decode.restype = ctypes.c_int
        lib.jpeg_region_decode.argtypes = [ctypes.c_void_p, ctypes.c_ulong] + [ctypes.c_int] * 5 + [ctypes.c_void_p]
    return lib


def decode_region(data: bytes | memoryview, box: tuple[int, int, int, int], scale: int = 1) -> torch.Tensor | None:
    """The RGB pixels of ``box`` = (top, left, height, width) of the JPEG ``data`` decoded at
    1/``scale`` (1, 2, 4 or 8; the box in that scaled image's pixels): uint8 (3, height, width)
    with (height, width, 3) memory, equal to the same box of a full decode at that scale.

    None where the library is unavailable, and for data it declines: a colour space other than
    greyscale, YCbCr or RGB (CMYK), a sampling layout other than chroma 1x1 with luma up to 2x2
    (libjpeg-turbo 2.1 crops luma 4x2 and 2x4 wrongly), a box outside the image, data that does
    not end with JPEG's end-of-image marker (a truncated file, whatever the box; also a file with
    bytes after the marker), and anything libjpeg warns or errs about while decoding down to the
    box's last row.
    The caller's whole decode then decides, as it always did, so a file Pillow refuses is refused.
    The rows below the box are not decoded at all: damage there that Pillow would refuse (an
    error, not one of libjpeg's warnings, which Pillow ignores) goes unnoticed for this sample.
    """
    lib = region_decoder()
    if lib is None:
        return None
    top, left, height, width = box
    encoded = np.frombuffer(data, dtype=np.uint8)
    out = torch.empty((height, width, 3), dtype=torch.uint8)
    code = lib.jpeg_region_decode(
        encoded.ctypes.data, encoded.size, scale, left, top, width, height, ctypes.c_void_p(out.data_ptr())
    )
    return out.permute(2, 0, 1) if code == REGION_OK else None
