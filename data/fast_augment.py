"""RandAugment's costliest ops, bit-identical to Pillow's and faster: rotate, shear, translate,
sharpness.

timm's ``Rotate``, ``ShearX/Y`` and ``TranslateX/Y(Rel)`` call Pillow's generic per-pixel affine
engine (``Image.rotate`` / ``Image.transform(AFFINE)`` with BILINEAR or BICUBIC: about 0.9 and
2.3 ms on 224² RGB here), and ``Sharpness`` its 3x3 SMOOTH filter (0.9 ms) before a blend.
``pillow_ops.c`` (compiled on first use by ``data/native.py``) computes the same bytes with
Pillow's expressions in Pillow's order, one channel per vector lane: the rotation's 2-D filter
(x86-64 with AVX2; elsewhere Pillow's own rotate is used), the one 1-D pass a shear or translation
reduces to (the other source coordinate lands on a pixel centre, where Pillow's second pass
returns its value exactly), and the SMOOTH kernel in float. ``tests/test_fast_pipeline.py``
compares each with Pillow pixel for pixel over random sizes, magnitudes, fills and filters.

``fast_augment_ops`` copies a timm ``RandAugment`` or ``AutoAugment`` with these functions in
place of timm's; every random draw (op choice, probability, magnitude, interpolation) is timm's
own, in the same order. Other modes, filters and fills, and any machine where the C file cannot
be built, take Pillow's own calls.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageEnhance, ImageFilter
from timm.data import auto_augment

from .pillow_ops import BICUBIC, BILINEAR, DOUBLES6, fast_rotate_available, on_rgbx, ops_kernel


def _rgb_fill(fill: Any) -> bytes | None:
    """The 4 bytes of an RGB fill colour (R, G, B ints in 0..255), else None (Pillow's own call)."""
    if isinstance(fill, tuple) and len(fill) == 3 and all(isinstance(v, int) and 0 <= v < 256 for v in fill):
        return bytes(fill) + b"\xff"
    return None


def shift_rows(
    img: Image.Image,
    affine: tuple[float, ...],
    axis: int,
    resample: int,
    fill: tuple[int, int, int],
    portable: bool = False,
) -> Image.Image:
    """Pillow's ``img.transform(img.size, AFFINE, affine, resample, fillcolor=fill)`` of an RGB image
    for a map that moves along ``axis`` only (1: x, 0: y), computed by ``pillow_ops.c`` (its
    scalar form with ``portable``). Needs the kernel (``ops_kernel()`` not None)."""
    out, _ = on_rgbx(
        ops_kernel().shift_rows_rgbx,
        img,
        axis,
        DOUBLES6(*affine),
        int(resample == BICUBIC),
        _rgb_fill(fill),
        int(portable),
    )
    return out


def rotation_matrix(size: tuple[int, int], degrees: float) -> list[float]:
    """Pillow's ``Image.rotate(degrees)`` map from output pixel centres to the source (about the
    image's centre, no expansion), computed as it computes it."""
    width, height = size
    cx, cy = width / 2, height / 2
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    a, b, d, e = cos, sin, round(-math.sin(angle), 15), cos
    return [a, b, (a * -cx + b * -cy + 0.0) + cx, d, e, (d * -cx + e * -cy + 0.0) + cy]


def _transform_along_axis(img: Image.Image, affine: tuple[float, ...], axis: int, kwargs: dict) -> Image.Image:
    """``img.transform(img.size, AFFINE, affine, **kwargs)`` for a map that moves along ``axis`` only."""
    resample = _draw_interpolation(kwargs)
    fill = kwargs.get("fillcolor")
    if img.mode != "RGB" or resample not in (BILINEAR, BICUBIC) or _rgb_fill(fill) is None or ops_kernel() is None:
        return img.transform(img.size, Image.Transform.AFFINE, affine, resample=resample, fillcolor=fill)
    return shift_rows(img, affine, axis, resample, fill)


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


def rotate(img: Image.Image, degrees: float, **kwargs: Any) -> Image.Image:
    """timm's ``rotate``: ``img.rotate(degrees, resample=<drawn>, fillcolor=...)``."""
    resample = _draw_interpolation(kwargs)
    fill = kwargs.get("fillcolor")
    # Pillow turns by whole quarter turns without resampling; those, like other modes, are its own.
    quarter_turn = degrees % 90.0 == 0.0
    if quarter_turn or img.mode != "RGB" or resample not in (BILINEAR, BICUBIC) or _rgb_fill(fill) is None:
        return img.rotate(degrees, resample=resample, fillcolor=fill)
    if not fast_rotate_available():
        return img.rotate(degrees, resample=resample, fillcolor=fill)
    matrix = DOUBLES6(*rotation_matrix(img.size, degrees))
    out, _ = on_rgbx(ops_kernel().affine_rgbx, img, matrix, int(resample == BICUBIC), _rgb_fill(fill))
    return out


def smooth(img: Image.Image) -> Image.Image:
    """Pillow's ``img.filter(ImageFilter.SMOOTH)`` of an RGB image, by ``pillow_ops.c`` where built."""
    lib = ops_kernel()
    if lib is not None and img.mode == "RGB":
        out, status = on_rgbx(lib.smooth_rgbx, img)
        if status == 0:
            return out
    return img.filter(ImageFilter.SMOOTH)


def sharpness(img: Image.Image, factor: float, **_: Any) -> Image.Image:
    """timm's ``sharpness``: ``ImageEnhance.Sharpness(img).enhance(factor)``, a blend of the image
    with its SMOOTH-filtered copy (``smooth``)."""
    if img.mode != "RGB":
        return ImageEnhance.Sharpness(img).enhance(factor)
    return Image.blend(smooth(img), img, factor)


# timm's op functions and their replacements; any other op is left as it is.
REPLACEMENTS: dict[Callable, Callable] = {
    auto_augment.shear_x: shear_x,
    auto_augment.shear_y: shear_y,
    auto_augment.translate_x_abs: translate_x_abs,
    auto_augment.translate_y_abs: translate_y_abs,
    auto_augment.translate_x_rel: translate_x_rel,
    auto_augment.translate_y_rel: translate_y_rel,
    auto_augment.rotate: rotate,
    auto_augment.sharpness: sharpness,
}


def _ops(step: Any) -> list[Any]:
    if isinstance(step, auto_augment.RandAugment):
        return list(step.ops)
    if isinstance(step, auto_augment.AutoAugment):
        return [op for sub_policy in step.policy for op in sub_policy]
    return []


def fast_augment_ops(step: Any) -> Any:
    """A copy of timm's ``RandAugment`` / ``AutoAugment`` ``step`` whose rotate, shear, translate and
    sharpness ops run ``pillow_ops.c`` (Pillow's own where it is unavailable); any other step is
    returned as it is."""
    if not any(op.aug_fn in REPLACEMENTS for op in _ops(step)):
        return step
    fast_rotate_available()  # built (once, if missing) and loaded here, not in each loader worker
    fast = copy.deepcopy(step)
    for op in _ops(fast):
        op.aug_fn = REPLACEMENTS.get(op.aug_fn, op.aug_fn)
    return fast
