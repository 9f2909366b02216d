"""``pillow_ops.c``: Pillow's own arithmetic in C, the same bytes, faster; loaded and wrapped here.

The C file (compiled on first use by ``data/native.py``) holds RandAugment's costliest ops
(rotate, shear, translate, sharpness; used by ``data/fast_augment.py``) and Pillow's resize
computed for a window of its output only (``resize_window``: timm's eval resize + centre crop,
and the training crop resized from a reduced decode; used by ``data/fast_transforms.py``). Each
reproduces Pillow's expressions in Pillow's order (the resize: its double-precision coefficients
rounded to its 22-bit fixed point, then integer sums, equal in any order), so the tests compare
them with Pillow byte for byte. Where the file cannot be built every caller keeps Pillow's call.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .native import native_library

SOURCE = Path(__file__).with_name("pillow_ops.c")
BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC
DOUBLES6 = ctypes.c_double * 6
_FLOATS4 = ctypes.c_float * 4
_INTS4 = ctypes.c_int * 4
# Pillow 12 resizes in C horizontally first, except (in Python) an image over 100 times taller than
# wide that loses height, which it resizes vertically first; resize_window follows that rule. Pillow
# 13 picks the order in C by another rule, so there the C resize is not used (Pillow's own is).
_PILLOW_MAJOR = int(Image.__version__.split(".")[0])
RESIZE_ORDER_KNOWN = _PILLOW_MAJOR <= 12


@functools.cache
def ops_kernel() -> ctypes.CDLL | None:
    """``pillow_ops.c`` compiled and loaded (``data/native.py``), or None where it cannot be built."""
    lib = native_library(SOURCE, ("m",), "RandAugment's ops and the resize with Pillow's arithmetic; Pillow's are used")
    if lib is not None:
        pixels = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.affine_rgbx.restype = ctypes.c_int
        lib.affine_rgbx.argtypes = pixels + [ctypes.POINTER(ctypes.c_double), ctypes.c_int, ctypes.c_char_p]
        lib.shift_rows_rgbx.restype = None
        lib.shift_rows_rgbx.argtypes = pixels + [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_double),
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        lib.smooth_rgbx.restype = ctypes.c_int
        lib.smooth_rgbx.argtypes = pixels
        lib.resample_source_window.restype = ctypes.c_int
        lib.resample_source_window.argtypes = [ctypes.c_int] * 5 + [_FLOATS4] + [ctypes.c_int] * 4 + [_INTS4]
        lib.resample_rgb.restype = ctypes.c_int
        lib.resample_rgb.argtypes = (
            [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t]
            + [ctypes.c_int] * 7
            + [_FLOATS4]
            + [ctypes.c_int] * 4
            + [ctypes.c_void_p, ctypes.c_int]
        )
    return lib


@functools.cache
def fast_rotate_available() -> bool:
    """Whether ``pillow_ops.c`` rotates on this CPU (x86-64 with AVX2); elsewhere Pillow does."""
    lib = ops_kernel()
    if lib is None:
        return False
    out = ctypes.create_string_buffer(4)
    return lib.affine_rgbx(bytes(4), out, 1, 1, DOUBLES6(1, 0, 0, 0, 1, 0), 0, bytes(4)) == 0


def on_rgbx(fn: Callable[..., Any], img: Image.Image, *args: Any) -> tuple[Image.Image, Any]:
    """``fn(in, out, height, width, *args)`` on ``img``'s pixels as Pillow stores RGB (4 bytes each):
    the RGB image it wrote and what it returned."""
    data = img.tobytes("raw", "RGBX")
    out = ctypes.create_string_buffer(len(data))
    result = fn(data, out, img.height, img.width, *args)
    return Image.frombytes("RGB", img.size, memoryview(out), "raw", "RGBX"), result


def resize_applies(size: tuple[int, int], out_size: tuple[int, int], resample: Any) -> bool:
    """Whether ``resize_window`` computes Pillow's resize of a ``size`` (width, height) image to
    ``out_size`` with ``resample`` (else the caller uses Pillow's)."""
    (width, height), (out_w, out_h) = size, out_size
    vertical_first = height > width * 100 and out_h < height
    return (
        RESIZE_ORDER_KNOWN
        and resample in (BILINEAR, BICUBIC)
        and min(width, height, out_w, out_h) > 0
        and not vertical_first
        and ops_kernel() is not None
    )


def resize_window(
    pixels: np.ndarray,
    size: tuple[int, int],
    out_size: tuple[int, int],
    resample: Any,
    window: tuple[int, int, int, int],
    box: tuple[float, float, float, float] | None = None,
    origin: tuple[int, int] = (0, 0),
    portable: bool = False,
) -> np.ndarray | None:
    """Pillow's ``img.resize(out_size, resample, box).crop(window)`` where ``resize_applies``.

    pixels: uint8 (h, w, 3 or 4) (RGB or RGBX rows, the channel and pixel strides packed) holding
    the ``size`` = (width, height) image from pixel ``origin`` = (x, y) on; it must cover
    ``source_window``. window: (left, top, width, height) inside the output. Returns uint8
    (height, width, 3) of the window, or None if C ran out of memory. ``portable``: the scalar
    horizontal pass (the tests compare both with Pillow).
    """
    (width, height), (out_w, out_h) = size, out_size
    left, top, w, h = window
    box = box if box is not None else (0.0, 0.0, float(width), float(height))
    _check_resize(pixels, size, out_size, window, box)
    row_bytes = pixels.shape[1] * pixels.shape[2]
    if pixels.strides[2] != 1 or pixels.strides[1] != pixels.shape[2] or pixels.strides[0] < row_bytes:
        pixels = np.ascontiguousarray(pixels)
    out = np.empty((h, w, 3), dtype=np.uint8)
    end = (pixels.shape[0] - 1) * pixels.strides[0] + row_bytes  # the bytes the C may read
    status = ops_kernel().resample_rgb(
        pixels.ctypes.data,
        end,
        pixels.shape[2],
        pixels.strides[0],
        origin[0],
        origin[1],
        width,
        height,
        out_w,
        out_h,
        int(resample == BICUBIC),
        _FLOATS4(*box),
        left,
        top,
        w,
        h,
        out.ctypes.data,
        int(portable),
    )
    return out if status == 0 else None


def _check_resize(
    pixels: np.ndarray,
    size: tuple[int, int],
    out_size: tuple[int, int],
    window: tuple[int, int, int, int],
    box: tuple[float, float, float, float],
) -> None:
    """Raise ValueError for arguments the C code would read out of bounds with (Pillow raises for
    a box outside the image too)."""
    (width, height), (out_w, out_h) = size, out_size
    left, top, w, h = window
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"resize_window needs uint8 (h, w, 3 or 4) pixels, got {pixels.dtype} {pixels.shape}")
    if not (0 <= box[0] <= box[2] <= width and 0 <= box[1] <= box[3] <= height):
        raise ValueError(f"box {box} is not inside the {width}x{height} image")
    if not (w >= 1 and h >= 1 and 0 <= left and left + w <= out_w and 0 <= top and top + h <= out_h):
        raise ValueError(f"window {window} is not inside the {out_w}x{out_h} output")


def source_window(
    size: tuple[int, int],
    out_size: tuple[int, int],
    resample: Any,
    window: tuple[int, int, int, int],
    box: tuple[float, float, float, float] | None = None,
) -> tuple[int, int, int, int]:
    """The input pixels (x0, y0, x1, y1) that ``resize_window`` reads for ``window``."""
    (width, height), (out_w, out_h) = size, out_size
    box = box if box is not None else (0.0, 0.0, float(width), float(height))
    _check_resize(np.empty((1, 1, 3), np.uint8), size, out_size, window, box)
    found = _INTS4()
    if (
        ops_kernel().resample_source_window(
            width, height, out_w, out_h, int(resample == BICUBIC), _FLOATS4(*box), *window, found
        )
        != 0
    ):
        raise MemoryError("pillow_ops.c: no memory for the resize coefficients")
    return tuple(found)
