"""Training samples kept in uint8 until their batch is on its device (``DATA.PIPELINE fast``).

A loader worker hands over each augmented image as its RGB pixels, uint8 (H, W, 3), with the
rectangles random erasing drew for it and the fill of each; ``Uint8Batch.to(device)`` then
converts, normalises and erases the whole batch where the model runs. Why: per sample,
``ToTensor`` + ``Normalize`` was a tenth of a worker's time, and a float32 image is four times the
bytes of its pixels through the loader's shared memory, pinning and the host-to-device copy.

Nothing about the result changes. The conversion is the reference's float32 arithmetic in the
reference's order (x / 255, then (x - mean) / std), so the batch is bit-identical to stacking the
reference's samples. The erasing is timm's own ``RandomErasing``, called in the worker on an
``ErasingRecorder`` that stands in for the normalised tensor: it draws the same rectangles from
Python's ``random`` and the same fills from torch's generator as on a real tensor, and the
recorder keeps them for the batch to paste after normalising.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torch.utils.data._utils.collate import collate, default_collate_fn_map

# One row of Uint8Batch.boxes: where an erasure goes and where its fill lies in Uint8Batch.fills.
BOX_FIELDS = ("sample", "top", "left", "height", "width", "fill_height", "fill_width", "offset")


class ErasingRecorder:
    """A stand-in for one normalised (C, H, W) float tensor that records what is written into it.

    timm's ``RandomErasing`` reads the tensor's ``size()`` and ``dtype`` and assigns its fill to
    ``img[:, top:top + h, left:left + w]``; each assignment is kept as ``(top, left, h, w, fill)``
    with ``fill`` (C, h, w) for per-pixel noise or (C, 1, 1) for one colour per rectangle.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        # What other timm versions read of the tensor: its device (for the fills) and rank.
        self.device = torch.device("cpu")
        self.ndim = len(self.shape)
        self.erasures: list[tuple[int, int, int, int, torch.Tensor]] = []

    def size(self) -> torch.Size:
        return self.shape

    def dim(self) -> int:
        return len(self.shape)

    def __setitem__(self, key: Any, value: Any) -> None:
        if not (isinstance(key, tuple) and len(key) == 3 and key[0] == slice(None)):
            raise TypeError(f"ErasingRecorder records writes of a whole-channel rectangle, not {key!r}")
        rows, cols = key[1].indices(self.shape[1]), key[2].indices(self.shape[2])
        fill = torch.as_tensor(value, dtype=self.dtype)
        if fill.dim() != 3:
            fill = fill.reshape(-1, 1, 1).expand(self.shape[0], 1, 1)
        top, left = rows[0], cols[0]
        self.erasures.append((top, left, rows[1] - top, cols[1] - left, fill.contiguous()))


class Uint8Image:
    """One training sample before normalisation: ``pixels`` uint8 (H, W, 3), the ``erasures``
    recorded for it, and the ``mean`` and ``std`` (per channel) to normalise with."""

    __slots__ = ("erasures", "mean", "pixels", "std")

    def __init__(
        self,
        pixels: torch.Tensor,
        erasures: list[tuple[int, int, int, int, torch.Tensor]],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.pixels = pixels
        self.erasures = erasures
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @classmethod
    def from_image(cls, img: Image.Image, **kwargs: Any) -> Uint8Image:
        """``img`` (RGB, any other mode is converted) as uint8 (H, W, 3)."""
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return cls(torch.from_numpy(np.asarray(rgb).copy()), **kwargs)

    def normalized(self) -> torch.Tensor:
        """The float (3, H, W) tensor the reference transform returns for this sample."""
        return Uint8Batch.collate([self]).to("cpu")[0]


class Uint8Batch:
    """A collated batch of ``Uint8Image``: ``pixels`` (B, H, W, 3) uint8, every fill flattened into
    ``fills`` (float32) and one row per erasure in ``boxes`` (int64, columns ``BOX_FIELDS``),
    ``mean`` and ``std`` (3,) float32.

    ``to(device)`` returns the model's input, float32 (B, 3, H, W); the loader's pinning calls
    ``pin_memory()``. ``boxes`` stays on the host: pasting the fills reads it without a device sync.
    """

    def __init__(
        self, pixels: torch.Tensor, fills: torch.Tensor, boxes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        self.pixels = pixels
        self.fills = fills
        self.boxes = boxes
        self.mean = mean
        self.std = std

    @classmethod
    def collate(cls, images: Sequence[Uint8Image]) -> Uint8Batch:
        # default_collate puts the stacked pixels in shared memory inside a loader worker.
        pixels = default_collate([img.pixels for img in images])
        fills: list[torch.Tensor] = []
        rows: list[list[int]] = []
        offset = 0
        for i, img in enumerate(images):
            if (img.mean, img.std) != (images[0].mean, images[0].std):
                raise ValueError("a Uint8Batch needs one mean and std for all its images")
            for top, left, h, w, fill in img.erasures:
                rows.append([i, top, left, h, w, fill.shape[1], fill.shape[2], offset])
                fills.append(fill.flatten())
                offset += fill.numel()
        return cls(
            pixels,
            torch.cat(fills) if fills else torch.zeros(0),
            torch.tensor(rows, dtype=torch.int64).reshape(-1, len(BOX_FIELDS)),
            torch.tensor(images[0].mean, dtype=torch.float32),
            torch.tensor(images[0].std, dtype=torch.float32),
        )

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def pin_memory(self) -> Uint8Batch:
        pinned = (t.pin_memory() for t in (self.pixels, self.fills, self.mean, self.std))
        pixels, fills, mean, std = pinned
        return Uint8Batch(pixels, fills, self.boxes, mean, std)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """float32 (B, 3, H, W) on ``device``: normalised, then erased."""
        pixels = self.pixels.to(device, non_blocking=non_blocking)
        batch, height, width, channels = pixels.shape
        out = torch.empty((batch, channels, height, width), dtype=torch.float32, device=pixels.device)
        out.copy_(pixels.permute(0, 3, 1, 2))
        # Every copy is asynchronous with pinned tensors: nothing here waits for the device.
        mean = self.mean.to(out.device, non_blocking=non_blocking).view(1, -1, 1, 1)
        std = self.std.to(out.device, non_blocking=non_blocking).view(1, -1, 1, 1)
        # ToTensor's x / 255, then Normalize's (x - mean) / std: the same float32 operations. 255 as
        # a tensor: CUDA multiplies by the reciprocal of a Python scalar divisor, which can differ
        # from the division in the last bit; a tensor divisor is divided exactly, as on the CPU.
        out.div_(torch.full((), 255.0, device=out.device)).sub_(mean).div_(std)
        if len(self.boxes):
            fills = self.fills.to(out.device, non_blocking=non_blocking)
            for i, top, left, h, w, fh, fw, offset in self.boxes.tolist():
                fill = fills[offset : offset + channels * fh * fw].view(channels, fh, fw)
                out[i, :, top : top + h, left : left + w] = fill
        return out


def _collate_uint8_images(batch: Sequence[Uint8Image], *, collate_fn_map: Any = None) -> Uint8Batch:
    return Uint8Batch.collate(batch)


# default_collate's own rules, plus one: Uint8Image samples, at any depth, become a Uint8Batch.
COLLATE_FN_MAP = {**default_collate_fn_map, Uint8Image: _collate_uint8_images}


def collate_samples(batch: Sequence[Any]) -> Any:
    """The loaders' ``collate_fn``: ``default_collate``, except that ``Uint8Image``s (a
    classification sample's image, or the image of SimMIM's (image, mask)) become one
    ``Uint8Batch``."""
    return collate(batch, collate_fn_map=COLLATE_FN_MAP)
