"""The training transform of the recipe, faster, with the same random draws (``DATA.PIPELINE fast``).

``FastTrainTransform`` wraps timm's train ``Compose`` (what ``DATA.PIPELINE reference`` uses) and
runs the same steps in the same order, drawing the same random numbers from the same generators,
so under a per-sample seed (``data/sample_seeds.py``) it picks the same crop box, interpolation,
flip, RandAugment ops and magnitudes and erasing rectangle as the reference. What changes is how
the pixels are computed:

* Decode at reduced size. Given an undecoded JPEG (``data.robust.EncodedImage``), the crop box is
  drawn from the header's size first; when the box is at least 1.25 k times the output size on
  both sides (k = 8, 4 or 2, the largest that fits; ``DRAFT_MARGIN``), libjpeg decodes at 1/k
  scale (through ``decode_region``, else Pillow's ``draft``) and the box, scaled by 1/k with
  fractional coordinates, is resized straight from the reduced image. The resize is then still a
  reduction, so no detail the output could hold is lost; the pixels differ from the full decode +
  crop + resize by about one grey level on average, under 2.5 for any crop (README, "A faster
  input pipeline").
* Only the part of a JPEG the crop reads is decoded (``data/jpeg_region.py``, libjpeg-turbo's
  partial decoding, compiled on first use): the box at full scale, the scaled box plus the resize
  filter's reach at 1/k. The same pixels as a whole decode; ×1.11 on the whole transform per
  500x375 JPEG, ×1.17 at 1000x750. Where the library cannot be built, whole images are decoded.
* Any other RGB crop (a smaller box, PNG, an already decoded image) is resized by torch's
  antialiased uint8 kernel (``resized_crop``): Pillow's filter in fixed point, within 2 grey
  levels of timm's crop + resize, a third of its time. A JPEG decoded in full for it is decoded
  by torchvision's libjpeg call (``decode_jpeg_pixels``): Pillow's pixels exactly, straight into a
  tensor, 0.1-0.15 ms sooner per image here.
* Where a float sample is wanted (``uint8_output`` off), ``ToTensor`` + ``Normalize`` as one
  conversion into a preallocated (3, H, W) tensor and two in-place operations; the arithmetic is
  the reference's (x / 255, then (x - mean) / std in float32), so the result is bit-identical.
* The decoded RGB image is used as it is; ``load_rgb``'s ``convert("RGB")`` copies it, and for a
  1000x750 JPEG that copy makes the C allocator hand out fresh pages on every image (about 1,000
  page faults per image here, half of a 10 ms decode). The same pixels either way.
* RandAugment's (or AutoAugment's) rotate, shear, translate and sharpness ops computed by a
  small C kernel, bit-identical to Pillow's (``data/fast_augment.py``).
* The horizontal flip after the crop drawn as torchvision draws it and applied while the resized
  crop's planes are copied into Pillow, instead of as a transpose of the image after.
* Normalisation and erasing per batch, on the model's device (``data/uint8_batches.py``): a
  sample leaves the worker as uint8 pixels plus the rectangles and fills timm's erasing drew for
  it (its own draws, recorded), a quarter of the bytes; the batch is normalised with the
  reference's float32 operations and the fills pasted, so it is bit-identical to the stacked
  reference samples.

Flip, RandAugment / colour jitter and random erasing are timm's own objects (RandAugment a copy
with those four ops swapped), called as in the reference.

``RobustImageDataset`` calls ``decode_encoded`` inside its load guard (so a truncated JPEG is
still unreadable at load time and substituted) and then the transform on the result;
``FastTrainTransform`` also takes decoded PIL images (zip caches, shards, placeholders) and
``EncodedImage`` directly.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, JpegImagePlugin
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import functional as F

from errors import UserError

from .fast_augment import fast_augment_ops
from .jpeg_region import decode_region, region_decoder
from .pillow_ops import ops_kernel, resize_applies, resize_window
from .robust import EncodedImage, decode_opened
from .uint8_batches import ErasingRecorder, Uint8Image

PIPELINES = ("fast", "reference")


def training_pipeline(config: Any) -> str:
    """``config.DATA.PIPELINE``, checked: 'fast' or 'reference' (else a one-line ``UserError``)."""
    pipeline = str(config.DATA.PIPELINE)
    if pipeline not in PIPELINES:
        raise UserError(f"DATA.PIPELINE is {pipeline!r}; use one of {', '.join(PIPELINES)}")
    return pipeline


# Reduction factors libjpeg's DCT scaling offers through Pillow's draft, largest first.
DRAFT_FACTORS = (8, 4, 2)
# A crop box is decoded at 1/k only when it is at least DRAFT_MARGIN * k times the output on both
# sides, so the resize after the reduced decode still shrinks by 1.25 or more. Measured on crops of
# photos: with margin 1.0 the mean difference to the full decode reaches 4.5 grey levels for boxes
# just over k times the output; with 1.25 it is about 1 on average and at most 2.4. For scale:
# bicubic and bilinear resizes of the same box (timm's 'random' interpolation uses both) differ by
# 1.5 on average and up to 2.5.
DRAFT_MARGIN = 1.25


class DecodedCrop:
    """What the decode stage hands to ``FastTrainTransform.__call__``: the decoded pixels, the crop
    box drawn on the full-size image, the interpolation, and the state of Python's ``random`` right
    after those draws.

    ``image`` is a PIL image or uint8 pixels (3, h, w) (``decode_region``, ``decode_jpeg_pixels``)
    holding the file decoded at ``1/scale``, or a rectangle of it whose top-left pixel is
    ``origin`` = (y, x) in that scaled image.
    """

    __slots__ = ("box", "image", "interpolation", "origin", "random_state", "scale")

    def __init__(
        self,
        image: Image.Image | torch.Tensor,
        box: tuple[int, int, int, int],
        scale: int,
        interpolation: F.InterpolationMode,
        random_state: Any,
        origin: tuple[int, int] = (0, 0),
    ) -> None:
        self.image = image
        self.box = box
        self.scale = scale
        self.interpolation = interpolation
        self.random_state = random_state
        self.origin = origin


# The interpolations timm's crop draws that torch's antialiased uint8 resize computes as Pillow does.
TORCH_RESIZE_MODES = {F.InterpolationMode.BILINEAR: "bilinear", F.InterpolationMode.BICUBIC: "bicubic"}
# JPEG modes (as Pillow reads the header) whose RGB pixels torchvision's libjpeg decode gives exactly
# as Pillow's decode + convert("RGB") does: YCbCr or RGB colour, and greyscale. CMYK stays Pillow's.
TORCH_DECODE_MODES = ("RGB", "L")


def decode_jpeg_pixels(encoded: EncodedImage) -> torch.Tensor | None:
    """A JPEG's RGB pixels, uint8 (3, H, W) with (H, W, 3) memory, by torchvision's libjpeg decode.

    The same pixels as Pillow's decode + ``convert("RGB")`` (both libjpeg-turbo with the accurate
    integer IDCT and smooth chroma upsampling; tested equal over subsamplings, progressive and
    greyscale files), 0.1-0.15 ms less per 500x375 to 1000x750 image here, and no Pillow image of
    4 bytes per pixel to copy out of. None for other formats and modes, and for data torchvision
    refuses: it treats libjpeg's warnings (a truncated file, corrupt data) as errors, and the
    caller's Pillow decode then decides, as it always did, whether the file is readable.
    """
    if encoded.format != "JPEG" or encoded.mode not in TORCH_DECODE_MODES:
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision announces the removal of its image codecs
        return None
    data = torch.frombuffer(bytearray(encoded.data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the same announcement, on every call
            return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def planes_to_image(planes: np.ndarray) -> Image.Image:
    """An RGB image from uint8 planes (3, H, W); Pillow interleaves them (a fifth of a transpose's time)."""
    _, height, width = planes.shape
    bands = [Image.frombuffer("L", (width, height), np.ascontiguousarray(p), "raw", "L", 0, 1) for p in planes]
    return Image.merge("RGB", bands)


def resize_pixels(
    pixels: torch.Tensor, size: tuple[int, int], interpolation: F.InterpolationMode, mirror: bool = False
) -> Image.Image:
    """uint8 RGB pixels (3, h, w), any strides, resized to ``size`` (height, width) by torch's
    antialiased uint8 kernel (bilinear or bicubic, ``TORCH_RESIZE_MODES``); an RGB PIL image,
    flipped left to right when ``mirror`` (free here: the planes are copied into Pillow anyway)."""
    batch = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # the kernel's fast layout
    mode = TORCH_RESIZE_MODES[interpolation]
    out = torch.nn.functional.interpolate(batch, size=tuple(size), mode=mode, antialias=True, align_corners=False)
    planes = out[0].numpy()
    return planes_to_image(planes[:, :, ::-1] if mirror else planes)


def resized_crop(
    img: Image.Image,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    interpolation: F.InterpolationMode,
    mirror: bool = False,
) -> Image.Image:
    """torchvision's ``resized_crop(img, *box, size, interpolation)`` (what timm's crop calls) for
    an RGB image, computed by torch's antialiased uint8 resize.

    box: (top, left, height, width) inside ``img``; size: (height, width). That kernel evaluates
    Pillow's separable bilinear / bicubic filter with the same support, in fixed point: the result is
    within 2 grey levels of Pillow's, 99.8 % of pixels equal (``tests/test_fast_pipeline.py``), and
    about three times faster on one core. Tensors, other modes and interpolations take
    torchvision's call. ``mirror``: then flipped left to right.
    """
    top, left, height, width = box
    if not isinstance(img, Image.Image) or img.mode != "RGB" or interpolation not in TORCH_RESIZE_MODES:
        out = F.resized_crop(img, top, left, height, width, list(size), interpolation)
        return F.hflip(out) if mirror else out
    region = np.array(img.crop((left, top, left + width, top + height)))
    return resize_pixels(torch.from_numpy(region).permute(2, 0, 1), size, interpolation, mirror)


def image_pixels(image: Image.Image | torch.Tensor) -> np.ndarray | None:
    """uint8 (H, W, 3 or 4) pixels of a decoded image for ``resize_window``: an RGB PIL image as
    Pillow stores it (RGBX), uint8 planes (3, H, W) with (H, W, 3) memory as that view; None for
    anything else."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            return None
        return image.permute(1, 2, 0).numpy()
    if isinstance(image, Image.Image) and image.mode == "RGB":
        width, height = image.size
        return np.frombuffer(image.tobytes("raw", "RGBX"), dtype=np.uint8).reshape(height, width, 4)
    return None


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height) of a PIL image or of pixels (C, H, W)."""
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])


def pillow_resize(
    image: Image.Image | torch.Tensor,
    out_size: tuple[int, int],
    resample: Any,
    window: tuple[int, int, int, int],
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray | None:
    """Pillow's ``image.resize(out_size, resample, box).crop(window)`` (window: left, top, width,
    height) of a decoded image computed by ``pillow_ops.resize_window``: uint8 (height, width, 3),
    the same bytes; None where that does not apply (the caller then runs Pillow's)."""
    pixels = image_pixels(image)
    if pixels is None:
        return None
    size = (pixels.shape[1], pixels.shape[0])
    if not resize_applies(size, out_size, resample):
        return None
    return resize_window(pixels, size, out_size, resample, window, box)


class FastResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` (``reference``), with decoding at reduced size.

    The box and the interpolation are drawn by the reference's own ``get_params`` and the same
    ``random.choice``, so they are identical for the same random state.
    """

    def __init__(self, reference: RandomResizedCropAndInterpolation, partial: bool = True) -> None:
        self.reference = reference
        self.size = tuple(reference.size)  # (height, width)
        self.partial = partial  # decode only the part of a JPEG the crop reads (decode_region)

    def draw(self, img: Image.Image) -> tuple[tuple[int, int, int, int], F.InterpolationMode]:
        """The crop box ``(top, left, height, width)`` and interpolation, as the reference draws them."""
        ref = self.reference
        box = ref.get_params(img, ref.scale, ref.ratio)
        interpolation = ref.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        return box, interpolation

    def draft_factor(self, img: Image.Image, box: tuple[int, int, int, int]) -> int:
        """The largest of 8, 4, 2 by which ``img`` may be decoded for ``box`` (1: decode in full).

        Only JPEGs, and only while the reduced box is still ``DRAFT_MARGIN`` times the output size
        on both sides.
        """
        if not isinstance(img, JpegImagePlugin.JpegImageFile):
            return 1
        _, _, h, w = box
        out_h, out_w = self.size
        for k in DRAFT_FACTORS:
            if h >= DRAFT_MARGIN * k * out_h and w >= DRAFT_MARGIN * k * out_w:
                return k
        return 1

    def decode(self, encoded: EncodedImage, seed: int | None = None) -> DecodedCrop:
        """Draw the box on the header's size, then decode, at reduced size when the box allows it.

        With ``seed`` the box is drawn from Python's ``random`` seeded as ``seeded_rngs(seed)``
        seeds it, and the global state is put back afterwards; without, from the global stream.
        """
        img = encoded.open()
        if seed is None:
            box, interpolation = self.draw(img)
            state = random.getstate()
        else:
            # Only Python's generator is drawn from here; seeding just it costs a tenth of seeded_rngs.
            outer = random.getstate()
            random.seed(seed)
            try:
                box, interpolation = self.draw(img)
                state = random.getstate()
            finally:
                random.setstate(outer)
        scale = 1
        k = self.draft_factor(img, box)
        # Bilinear and bicubic only: at reduced scale Pillow's box and nearest filters can switch a
        # whole source pixel when the box's offset (and so the rounding of its centres) changes.
        if self.partial and interpolation in TORCH_RESIZE_MODES:
            region = self.decode_region(encoded, box, k)
            if region is not None:
                pixels, origin = region
                return DecodedCrop(pixels, box, k, interpolation, state, origin)
        if k > 1:
            width = img.size[0]
            drafted = img.draft("RGB", (width // k, img.size[1] // k))
            if drafted is not None:
                # Pillow reports the full image's extent in the reduced one: width / scale.
                scale = round(width / drafted[1][2])
        if scale == 1 and interpolation in TORCH_RESIZE_MODES:
            pixels = decode_jpeg_pixels(encoded)
            if pixels is not None:
                return DecodedCrop(pixels, box, 1, interpolation, state)
        return DecodedCrop(decode_opened(img), box, scale, interpolation, state)

    def decode_region(
        self, encoded: EncodedImage, box: tuple[int, int, int, int], scale: int
    ) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """Only the part of a JPEG the crop reads, decoded at 1/``scale`` (``data.jpeg_region``): the
        pixels (3, h, w) and their top-left (y, x) in the scaled image, or None (not a JPEG of
        those modes, no partial decoding here, or data it declines).

        At full scale that part is the box. At reduced scale it is the scaled box widened by the
        reach of Pillow's resize filter (3 for Lanczos, the widest, times the reduction, plus a
        pixel for rounding), so the resize reads the same pixels as from the whole reduced image.
        """
        if encoded.format != "JPEG" or encoded.mode not in TORCH_DECODE_MODES:
            return None
        top, left, h, w = box
        if scale == 1:
            pixels = decode_region(encoded.data, box)
            return None if pixels is None else (pixels, (top, left))
        width, height = encoded.size
        scaled_width, scaled_height = -(-width // scale), -(-height // scale)  # libjpeg rounds up
        out_h, out_w = self.size
        reach = 3 * max(h / scale / out_h, w / scale / out_w, 1.0) + 1
        y0, x0 = max(0, math.floor(top / scale - reach)), max(0, math.floor(left / scale - reach))
        y1 = min(scaled_height, math.ceil((top + h) / scale + reach))
        x1 = min(scaled_width, math.ceil((left + w) / scale + reach))
        pixels = decode_region(encoded.data, (y0, x0, y1 - y0, x1 - x0), scale)
        return None if pixels is None else (pixels, (y0, x0))

    def crop(self, decoded: DecodedCrop, mirror: bool = False) -> Image.Image:
        """The output-size crop of a decoded image, flipped left to right when ``mirror``."""
        top, left, h, w = decoded.box
        oy, ox = decoded.origin
        image = decoded.image
        if decoded.scale == 1:
            if isinstance(image, torch.Tensor):
                region = image[:, top - oy : top - oy + h, left - ox : left - ox + w]
                return resize_pixels(region, self.size, decoded.interpolation, mirror)
            return resized_crop(image, (top - oy, left - ox, h, w), self.size, decoded.interpolation, mirror)
        s = decoded.scale
        region = (left / s - ox, top / s - oy, (left + w) / s - ox, (top + h) / s - oy)
        resample = F.pil_modes_mapping[decoded.interpolation]
        out_size = (self.size[1], self.size[0])
        out = pillow_resize(image, out_size, resample, (0, 0, *out_size), box=region)
        if out is not None:
            return Image.fromarray(out[:, ::-1] if mirror else out)
        if isinstance(image, torch.Tensor):
            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        out = image.resize(out_size, resample, box=region)
        return F.hflip(out) if mirror else out

    def __call__(self, img: Image.Image, mirror: bool = False) -> Image.Image:
        """A decoded image: the reference's box and interpolation, resized by ``resized_crop``."""
        box, interpolation = self.draw(img)
        return resized_crop(img, box, self.size, interpolation, mirror)


class FastRandomResizedCrop:
    """torchvision's ``RandomResizedCrop`` (``reference``, SimMIM's crop): its own box draw from
    torch's generator, the resize by ``resized_crop``."""

    def __init__(self, reference: transforms.RandomResizedCrop) -> None:
        self.reference = reference

    def __call__(self, img: Any) -> Any:
        ref = self.reference
        box = ref.get_params(img, ref.scale, ref.ratio)
        return resized_crop(img, box, tuple(ref.size), ref.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reference!r})"


def fast_compose(reference: transforms.Compose, uint8_output: bool = False) -> transforms.Compose:
    """``reference`` with torchvision's random resized crop and ToTensor + Normalize in their fast
    forms: the same random draws, the crop within ``resized_crop``'s tolerance. ``uint8_output``:
    a trailing ToTensor + Normalize is deferred to the batch (``Uint8Tail``)."""
    steps = [FastRandomResizedCrop(s) if type(s) is transforms.RandomResizedCrop else s for s in reference.transforms]
    return transforms.Compose(_fuse_to_tensor(deferred_to_batch(steps) if uint8_output else steps))


def deferred_to_batch(steps: Sequence[Callable]) -> list[Callable]:
    """``steps`` with a trailing ToTensor, Normalize[, RandomErasing] replaced by one ``Uint8Tail``
    (the sample stays uint8, normalised per batch on the model's device); as they are otherwise."""
    erasing = steps[-1] if steps and isinstance(steps[-1], RandomErasing) else None
    body = list(steps[:-1]) if erasing is not None else list(steps)
    if len(body) < 2 or not isinstance(body[-2], transforms.ToTensor) or not isinstance(body[-1], transforms.Normalize):
        return list(steps)
    return [*body[:-2], Uint8Tail(body[-1], erasing)]


class ToNormalizedTensor:
    """``ToTensor`` then ``Normalize(mean, std)``, bit-identical, in one pass plus two in-place ones.

    A tensor input is only normalised (timm's ``MaybeToTensor`` passes tensors through).
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, pic: Any) -> torch.Tensor:
        if isinstance(pic, Image.Image) and pic.mode == "RGB":
            width, height = pic.size
            out = torch.empty((3, height, width), dtype=torch.float32)
            out.copy_(torch.from_numpy(np.array(pic)).permute(2, 0, 1))
            # ToTensor's x / 255, then Normalize's (x - mean) / std: the same float32 operations.
            return out.div_(255).sub_(self.mean).div_(self.std)
        tensor = pic if isinstance(pic, torch.Tensor) else F.to_tensor(pic)
        return F.normalize(tensor, self.mean.flatten().tolist(), self.std.flatten().tolist())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _fuse_to_tensor(steps: Sequence[Callable]) -> list[Callable]:
    """``steps`` with each ToTensor directly followed by a (not in-place) Normalize fused into one."""
    fused: list[Callable] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        if isinstance(step, transforms.ToTensor) and isinstance(nxt, transforms.Normalize) and not nxt.inplace:
            fused.append(ToNormalizedTensor(nxt.mean, nxt.std))
            i += 2
        else:
            fused.append(step)
            i += 1
    return fused


class Uint8Tail:
    """The reference's last steps, ToTensor, Normalize and (optionally) RandomErasing, deferred to
    the batch: a PIL image becomes a ``Uint8Image`` carrying the erasures timm's ``erasing`` drew
    (``data/uint8_batches.py``); ``Uint8Batch.to(device)`` applies them all, bit-identically."""

    def __init__(self, normalize: transforms.Normalize, erasing: RandomErasing | None) -> None:
        self.normalize = normalize
        self.erasing = erasing

    def __call__(self, img: Image.Image) -> Uint8Image:
        sample = Uint8Image.from_image(img, erasures=[], mean=self.normalize.mean, std=self.normalize.std)
        if self.erasing is not None:
            height, width, channels = sample.pixels.shape
            recorder = ErasingRecorder((channels, height, width))
            self.erasing(recorder)
            sample.erasures = recorder.erasures
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.normalize!r}, {self.erasing!r}, on the batch's device)"


class FastTrainTransform:
    """timm's train transform ``reference`` (a ``Compose``) with the same draws, faster (module docstring).

    Takes a decoded PIL image, an ``EncodedImage`` or what ``decode_encoded`` returned; returns
    what ``reference`` returns, a float tensor (3, H, W), or with ``uint8_output`` (and a
    reference ending in ToTensor, Normalize[, RandomErasing]) a ``Uint8Image`` whose
    ``normalized()`` is that tensor and which the loader collates into a ``Uint8Batch``.
    ``transforms`` lists the reference's steps (the ones reproduced). RandAugment's /
    AutoAugment's rotate, shear, translate and sharpness run ``data.fast_augment``'s C form
    (bit-identical).
    ``partial_decode`` off: JPEGs are decoded whole, so every file is read to its end and damage
    anywhere in it is seen (``DATA.STRICT``).
    """

    def __init__(self, reference: transforms.Compose, uint8_output: bool = False, partial_decode: bool = True) -> None:
        self.reference = reference
        steps = list(reference.transforms)
        self.crop: FastResizedCrop | None = None
        self.flip: transforms.RandomHorizontalFlip | None = None
        if steps and isinstance(steps[0], RandomResizedCropAndInterpolation):
            self.crop = FastResizedCrop(steps.pop(0), partial_decode)
            # The C helpers are built (once, if missing) and loaded here, not in each loader worker.
            if partial_decode:
                region_decoder()
            ops_kernel()  # the reduced-scale crops' resize
            if steps and type(steps[0]) is transforms.RandomHorizontalFlip:
                self.flip = steps.pop(0)  # drawn as it draws, applied as the crop's planes are copied
        steps = _fuse_to_tensor(deferred_to_batch(steps) if uint8_output else steps)
        self.steps = [fast_augment_ops(step) for step in steps]

    @property
    def transforms(self) -> list[Callable]:
        return self.reference.transforms

    def decode_encoded(self, encoded: EncodedImage, seed: int | None = None) -> DecodedCrop | Image.Image:
        """The decode stage: draws the crop box and decodes (reduced when it can); raises what PIL
        raises for unreadable data. ``seed``: the seed the call on the result will run under
        (``seeded_rngs(seed)``), None when that call draws from the global generators; the global
        generators are left as they were when a seed is given."""
        if self.crop is None:
            return encoded.decode()
        return self.crop.decode(encoded, seed)

    def draw_mirror(self) -> bool:
        """The flip after the crop, drawn as torchvision's ``RandomHorizontalFlip`` draws it (one
        ``torch.rand(1)``, the first torch draw of the sample); False when there is none."""
        return self.flip is not None and bool(torch.rand(1) < self.flip.p)

    def __call__(self, img: Image.Image | EncodedImage | DecodedCrop) -> Any:
        if isinstance(img, EncodedImage):
            img = self.decode_encoded(img)
        if isinstance(img, DecodedCrop):
            # The box was drawn in the decode stage; continue Python's stream after those draws.
            if self.crop is None:
                raise TypeError("a DecodedCrop needs a transform that starts with a random resized crop")
            random.setstate(img.random_state)
            img = self.crop.crop(img, self.draw_mirror())
        elif self.crop is not None:
            img = self.crop(img, self.draw_mirror())
        for step in self.steps:
            img = step(img)
        return img

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        head = [self.crop.reference] if self.crop else []
        steps = head + ([self.flip] if self.flip else []) + self.steps
        lines += [f"    {s!r}" for s in steps]
        return "\n".join(lines + [")"])


class FastEvalTransform:
    """timm's evaluation transform (``reference``: Resize, CenterCrop, then ToTensor + Normalize
    deferred to the batch as a ``Uint8Tail``) with the same bytes, faster.

    The decode stage uses torchvision's libjpeg call where it takes the file (the same pixels as
    Pillow's decode; else Pillow's, which decides whether the file is readable), and only the
    centre crop of the resize is computed, by ``pillow_ops.c`` with Pillow's coefficients and
    integer sums (``resize_window``): the resize's other rows and columns are never made. Output
    size and crop box are torchvision's (the short side to ``size``, the long side truncated; the
    crop's offsets rounded as ``center_crop`` rounds them). Anything else (other steps, modes,
    filters, a crop larger than the image, a machine without the C file) runs ``reference``.
    """

    def __init__(self, reference: transforms.Compose) -> None:
        self.reference = reference
        steps = list(reference.transforms)
        self.resize = steps[0] if steps and type(steps[0]) is transforms.Resize else None
        self.center = steps[1] if len(steps) == 3 and type(steps[1]) is transforms.CenterCrop else None
        self.tail = steps[-1] if steps and type(steps[-1]) is Uint8Tail and steps[-1].erasing is None else None
        self.resample = F.pil_modes_mapping.get(self.resize.interpolation) if self.resize is not None else None
        self.fast = (
            self.resize is not None
            and self.tail is not None
            and len(steps) == 2 + (self.center is not None)
            and self.resize.max_size is None
        )
        if self.fast:
            ops_kernel()  # built (once, if missing) and loaded here, not in each loader worker

    @property
    def transforms(self) -> list[Callable]:
        return self.reference.transforms

    def decode_encoded(self, encoded: EncodedImage, seed: int | None = None) -> torch.Tensor | Image.Image:
        """The decode stage: the whole image, uint8 (3, H, W) from torchvision's libjpeg call where
        it takes the file, else Pillow's decode (which raises for unreadable data). ``seed`` is
        unused: nothing here is random."""
        pixels = decode_jpeg_pixels(encoded) if self.fast else None
        return pixels if pixels is not None else encoded.decode()

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int]] | None:
        """torchvision's resize output (width, height) for a ``width`` x ``height`` image and the
        crop (left, top, width, height) inside it; None where the crop would pad."""
        size = self.resize.size
        if isinstance(size, int) or len(size) == 1:
            target = size if isinstance(size, int) else size[0]
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = target, int(target * long / short)
            out = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            out = (size[1], size[0])
        if self.center is None:
            return out, (0, 0, *out)
        crop_h, crop_w = self.center.size
        if crop_w > out[0] or crop_h > out[1]:
            return None
        top, left = int(round((out[1] - crop_h) / 2.0)), int(round((out[0] - crop_w) / 2.0))
        return out, (left, top, crop_w, crop_h)

    def __call__(self, img: Image.Image | torch.Tensor | EncodedImage) -> Any:
        if isinstance(img, EncodedImage):
            img = self.decode_encoded(img)
        plan = self.plan(*image_size(img)) if self.fast else None
        out = pillow_resize(img, plan[0], self.resample, plan[1]) if plan is not None else None
        if out is not None:
            normalize = self.tail.normalize
            return Uint8Image(torch.from_numpy(out), erasures=[], mean=normalize.mean, std=normalize.std)
        if isinstance(img, torch.Tensor):
            img = Image.fromarray(img.permute(1, 2, 0).numpy())
        return self.reference(img)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("] + [f"    {s!r}" for s in self.reference.transforms]
        return "\n".join(lines + [")"])
