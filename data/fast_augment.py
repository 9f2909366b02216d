"""RandAugment's shear and translate ops, bit-identical to Pillow's and faster.

timm's ``ShearX``, ``ShearY``, ``TranslateXRel`` and ``TranslateYRel`` (and the ``Abs`` forms) call
``Image.transform(AFFINE, resample=BILINEAR or BICUBIC)``, Pillow's generic per-pixel engine (about
0.9 ms bilinear and 2.2 ms bicubic on 224² RGB here). Each of these maps moves pixels along one
axis only, so the other coordinate always lands on a pixel centre, where Pillow's 2-D filter
reduces exactly to its 1-D form along the moving axis. ``shift_rows`` evaluates that 1-D form in
C (``shift_rows.c``, compiled on first use by ``data/native.py``) with Pillow's arithmetic: the
source coordinate in double precision as its ``affine_transform`` computes it; the fill colour
where that coordinate falls outside the image; neighbours clamped at the border; the cubic
``v2 + d (p2 + d (p3 + d p4))`` (Pillow's a = -1 kernel) or the line ``a + (b - a) d`` in the same
order; then Pillow's clamp and truncation to uint8. ``tests/test_fast_pipeline.py`` compares it
with Pillow pixel for pixel over random magnitudes, sizes and fills. Rotate (a true 2-D
resampling) stays Pillow's, and so does everything where the C file cannot be built.

``fast_augment_ops`` copies a timm ``RandAugment`` or ``AutoAugment`` with these functions in
place of timm's; every random draw (op choice, probability, magnitude, interpolation) is timm's
own, in the same order.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from timm.data import auto_augment

from .native import native_library

BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC
SOURCE = Path(__file__).with_name("shift_rows.c")


@functools.cache
def shift_kernel() -> ctypes.CDLL | None:
    """``shift_rows.c`` compiled and loaded (``data/native.py``), or None where it cannot be built."""
    lib = native_library(SOURCE, (), "RandAugment's shear and translate; Pillow's own are used instead")
    if lib is not None:
        lib.shift_rows_rgb.restype = None
        lib.shift_rows_rgb.argtypes = (
            [ctypes.c_void_p, ctypes.c_void_p]
            + [ctypes.c_int] * 3
            + [
                ctypes.POINTER(ctypes.c_double),
                ctypes.c_int,
                ctypes.c_char_p,
            ]
        )
    return lib


def shift_rows(
    pixels: np.ndarray, affine: tuple[float, ...], axis: int, resample: int, fill: tuple[int, int, int]
) -> np.ndarray:
    """Pillow's ``transform(size, AFFINE, affine, resample, fillcolor=fill)`` of RGB ``pixels``
    (uint8 (H, W, 3)) for a map that moves along ``axis`` only (1: x, 0: y), computed by
    ``shift_rows.c``: uint8 (H, W, 3). Needs the kernel (``shift_kernel()`` not None)."""
    height, width, _ = pixels.shape
    pixels = np.ascontiguousarray(pixels)
    out = np.empty_like(pixels)
    shift_kernel().shift_rows_rgb(
        pixels.ctypes.data,
        out.ctypes.data,
        height,
        width,
        axis,
        (ctypes.c_double * 6)(*affine),
        int(resample == BICUBIC),
        bytes(fill),
    )
    return out


def _transform_along_axis(img: Image.Image, affine: tuple[float, ...], axis: int, kwargs: dict) -> Image.Image:
    """``img.transform(img.size, AFFINE, affine, **kwargs)`` for a map that moves along ``axis`` only."""
    resample = _draw_interpolation(kwargs)
    fill = kwargs.get("fillcolor")
    rgb_fill = isinstance(fill, tuple) and len(fill) == 3 and all(isinstance(v, int) and 0 <= v < 256 for v in fill)
    if img.mode != "RGB" or resample not in (BILINEAR, BICUBIC) or not rgb_fill or shift_kernel() is None:
        return img.transform(img.size, Image.Transform.AFFINE, affine, resample=resample, fillcolor=fill)
    return Image.fromarray(shift_rows(np.asarray(img), affine, axis, resample, fill))


def _draw_interpolation(kwargs: dict) -> Any:
    """timm's interpolation draw: ``random.choice`` over a tuple, else the value (default bicubic)."""
    interpolation = kwargs.get("resample", BICUBIC)
    if isinstance(interpolation, (list, tuple)):
        return random.choice(interpolation)
    return interpolation


def shear_x(img: Image.Image, factor: float, **kwargs: Any) -> Image.Image:
    return _transform_along_axis(img, (1, factor, 0, 0, 1, 0), 1, kwargs)


def shear_y(img: Image.Image, factor: float, **kwargs: Any) -> Image.Image:
    return _transform_along_axis(img, (1, 0, 0, factor, 1, 0), 0, kwargs)


def translate_x_abs(img: Image.Image, pixels: float, **kwargs: Any) -> Image.Image:
    return _transform_along_axis(img, (1, 0, pixels, 0, 1, 0), 1, kwargs)


def translate_y_abs(img: Image.Image, pixels: float, **kwargs: Any) -> Image.Image:
    return _transform_along_axis(img, (1, 0, 0, 0, 1, pixels), 0, kwargs)


def translate_x_rel(img: Image.Image, pct: float, **kwargs: Any) -> Image.Image:
    return translate_x_abs(img, pct * img.size[0], **kwargs)


def translate_y_rel(img: Image.Image, pct: float, **kwargs: Any) -> Image.Image:
    return translate_y_abs(img, pct * img.size[1], **kwargs)


# timm's op functions and their replacements; any other op is left as it is.
REPLACEMENTS: dict[Callable, Callable] = {
    auto_augment.shear_x: shear_x,
    auto_augment.shear_y: shear_y,
    auto_augment.translate_x_abs: translate_x_abs,
    auto_augment.translate_y_abs: translate_y_abs,
    auto_augment.translate_x_rel: translate_x_rel,
    auto_augment.translate_y_rel: translate_y_rel,
}


def _ops(step: Any) -> list[Any]:
    if isinstance(step, auto_augment.RandAugment):
        return list(step.ops)
    if isinstance(step, auto_augment.AutoAugment):
        return [op for sub_policy in step.policy for op in sub_policy]
    return []


def fast_augment_ops(step: Any) -> Any:
    """A copy of timm's ``RandAugment`` / ``AutoAugment`` ``step`` whose shear and translate ops run
    ``shift_rows`` (Pillow's own where the kernel is unavailable); any other step is returned as it is."""
    if not any(op.aug_fn in REPLACEMENTS for op in _ops(step)):
        return step
    shift_kernel()  # built (once, if missing) and loaded here, not in each loader worker
    fast = copy.deepcopy(step)
    for op in _ops(fast):
        op.aug_fn = REPLACEMENTS.get(op.aug_fn, op.aug_fn)
    return fast
