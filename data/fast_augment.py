"""RandAugment's shear and translate ops, bit-identical to Pillow's and faster.

timm's ``ShearX``, ``ShearY``, ``TranslateXRel`` and ``TranslateYRel`` (and the ``Abs`` forms) call
``Image.transform(AFFINE, resample=BILINEAR or BICUBIC)``, Pillow's generic per-pixel engine (about
0.9 ms bilinear and 2.2 ms bicubic on 224² RGB here). Each of these maps moves pixels along one
axis only, so the other coordinate always lands on a pixel centre, where Pillow's 2-D filter
reduces exactly to its 1-D form along the moving axis. ``shift_rows`` evaluates that 1-D form on
whole tensors with Pillow's arithmetic: the source coordinate in float64 as its
``affine_transform`` computes it; the fill colour where that coordinate falls outside the image;
neighbours clamped at the border; the cubic ``v2 + d (p2 + d (p3 + d p4))`` (Pillow's a = -1
kernel) or the line ``a + (b - a) d`` in float64 in the same order; then Pillow's clamp and
truncation to uint8. ``tests/test_fast_pipeline.py`` compares it with Pillow pixel for pixel over
random magnitudes, sizes and fills. Rotate (a true 2-D resampling) stays Pillow's.

``fast_augment_ops`` copies a timm ``RandAugment`` or ``AutoAugment`` with these functions in
place of timm's; every random draw (op choice, probability, magnitude, interpolation) is timm's
own, in the same order.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment

BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC
# Edge columns repeated on each side: a pixel inside the image reaches at most 2 past the border.
_PAD = 2


def source_coordinates(size: tuple[int, int], affine: tuple[float, ...], axis: int) -> torch.Tensor:
    """Pillow's source coordinate along ``axis`` (1: x, 0: y) for every output pixel.

    size: (height, width); affine: Pillow's (a0, a1, a2, a3, a4, a5). Returns float64
    ``a0*(x+.5) + a1*(y+.5) + a2`` (axis 1) or ``a3*(x+.5) + a4*(y+.5) + a5`` (axis 0) in Pillow's
    order of operations, shaped (H, W) for axis 1 and (W, H) for axis 0 (rows of the transposed
    image); (1, W) / (1, H) when the other coordinate's factor is 0 (adding 0 * (y+.5) changes no bit).
    """
    height, width = size
    x = torch.arange(width, dtype=torch.float64).add_(0.5)
    y = torch.arange(height, dtype=torch.float64).add_(0.5)
    if axis == 1:
        a, b, c = affine[0:3]
        along, across = x.view(1, width), y.view(height, 1)
    else:
        b, a, c = affine[3:6]
        along, across = y.view(1, height), x.view(width, 1)
    if b == 0:
        return a * along + c
    # Pillow evaluates (a0*x + a1*y) + a2; float addition commutes exactly.
    return (a * along + b * across) + c


def shift_rows(planes: torch.Tensor, coords: torch.Tensor, resample: int, fill: tuple[int, ...]) -> torch.Tensor:
    """Resample each row of ``planes`` at Pillow's source x coordinates, as Pillow's AFFINE transform.

    planes: uint8 (C, H, W), any strides; coords: float64 (H, W), or (1, W) when every row moves
    alike, the source x of each output pixel before Pillow's -0.5 pixel-centre shift; resample:
    BILINEAR or BICUBIC; fill: C values for pixels whose source lies outside [0, W). Returns uint8
    (C, H, W), contiguous.
    """
    channels, height, width = planes.shape
    frac = coords - 0.5
    base = frac.floor()
    frac.sub_(base)
    inside = (coords >= 0) & (coords < width)
    taps = (0, 1) if resample == BILINEAR else (-1, 0, 1, 2)
    edge = (channels, height, _PAD)
    padded = torch.cat([planes[:, :, :1].expand(edge), planes, planes[:, :, -1:].expand(edge)], 2).to(torch.int16)
    fill_planes = torch.tensor(fill, dtype=torch.int16).view(channels, 1, 1)
    sliced = False
    if coords.shape[0] == 1:
        # A translation: the columns that stay inside are one range [lo, hi); when every one of
        # them reads from the same whole-pixel offset, each tap is a slice of the padded rows.
        keep = inside[0].nonzero()
        lo, hi = (int(keep[0]), int(keep[-1]) + 1) if len(keep) else (0, 0)
        shift = base[:, lo:hi] - torch.arange(lo, hi, dtype=torch.float64)
        sliced = hi > lo and bool((shift == shift[0, 0]).all())
    if sliced:
        start = int(shift[0, 0]) + _PAD + lo
        values = [padded[:, :, start + k : start + k + hi - lo] for k in taps]
        frac = frac[:, lo:hi]
    else:
        # Pixels inside have base in [-1, W-1]; the clamp only touches pixels that take the fill.
        first = base.clamp_(-1, width - 1).to(torch.int64).add_(taps[0] + _PAD)
        index = first.expand(channels, height, width)
        values = [torch.gather(padded[:, :, k - taps[0] :], 2, index) for k in taps]
    # float64 arithmetic in one buffer; int16 operands are promoted exactly by the in-place ops.
    if resample == BILINEAR:
        a, b = values
        out = (b - a).to(torch.float64).mul_(frac).add_(a)
    else:
        v1, v2, v3, v4 = values
        p2 = v3 - v1
        p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
        p4 = (v2 - v1).sub_(v3).add_(v4)
        # p1 + d * (p2 + d * (p3 + d * p4)) in Pillow's order (+ commutes exactly), then its clamp.
        out = p4.to(torch.float64).mul_(frac).add_(p3).mul_(frac).add_(p2).mul_(frac).add_(v2).clamp_(0.0, 255.0)
    values = out.to(torch.int16)  # truncation toward zero, as Pillow's (UINT8) cast of a value >= 0
    if sliced:
        result = fill_planes.expand(channels, height, width).clone()
        result[:, :, lo:hi] = values
    else:
        result = values.sub_(fill_planes).mul_(inside.to(torch.int16)).add_(fill_planes)
    return result.to(torch.uint8)


def _transform_along_axis(img: Image.Image, affine: tuple[float, ...], axis: int, kwargs: dict) -> Image.Image:
    """``img.transform(img.size, AFFINE, affine, **kwargs)`` for a map that moves along ``axis`` only."""
    resample = _draw_interpolation(kwargs)
    fill = kwargs.get("fillcolor")
    if img.mode != "RGB" or resample not in (BILINEAR, BICUBIC) or not isinstance(fill, tuple) or len(fill) != 3:
        return img.transform(img.size, Image.Transform.AFFINE, affine, resample=resample, fillcolor=fill)
    width, height = img.size
    pixels = torch.from_numpy(np.array(img))  # (H, W, 3)
    coords = source_coordinates((height, width), affine, axis)
    if axis == 1:
        planes = shift_rows(pixels.permute(2, 0, 1), coords, resample, fill)
    else:
        planes = shift_rows(pixels.permute(2, 1, 0), coords, resample, fill).transpose(1, 2).contiguous()
    return planes_to_image(planes.numpy())


def planes_to_image(planes: np.ndarray) -> Image.Image:
    """An RGB image from uint8 planes (3, H, W); Pillow interleaves them (a fifth of a transpose's time)."""
    _, height, width = planes.shape
    bands = [Image.frombuffer("L", (width, height), np.ascontiguousarray(p), "raw", "L", 0, 1) for p in planes]
    return Image.merge("RGB", bands)


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
    ``shift_rows``; any other step is returned as it is."""
    if not any(op.aug_fn in REPLACEMENTS for op in _ops(step)):
        return step
    fast = copy.deepcopy(step)
    for op in _ops(fast):
        op.aug_fn = REPLACEMENTS.get(op.aug_fn, op.aug_fn)
    return fast
