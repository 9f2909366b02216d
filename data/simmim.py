"""SimMIM pre-training data: unlabelled images, the released transform and the random mask.

A sample is ``((image, mask), 0)``: the transformed image (3, S, S), its token mask (S/P, S/P) as
int64 (1 = masked) and a dummy label, since labels are ignored (-1 marks an unreadable image's
placeholder in validation). Masks are drawn
from NumPy's global RNG, which ``RobustImageDataset`` seeds per sample, so the mask of a
sample depends only on (SEED, epoch, position) like every other augmentation, and a
mid-epoch resume draws the same masks as the uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode

from config import model_section
from errors import UserError

from .fast_transforms import fast_compose, training_pipeline
from .robust import RobustImageDataset, load_rgb

logger = logging.getLogger(__name__)

# The release's pre-training crop: at least two thirds of the image, aspect ratio 3/4 to 4/3.
CROP_SCALE = (0.67, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class MaskGenerator:
    """Random masks over a square image: ``ceil(ratio · n²)`` of the n×n mask patches, each
    covering (mask_patch / model_patch)² model patches.

    ``__call__()`` → (input_size / model_patch,)² int64 array, 1 = masked; released values:
    image 192, mask patch 32, model patch 4, ratio 0.6 (22 of 36 cells, a 48×48 token mask).
    Sizes that do not divide raise ``UserError`` naming the sizes that work.
    """

    def __init__(self, input_size: int = 192, mask_patch: int = 32, model_patch: int = 4, ratio: float = 0.6) -> None:
        check_mask_sizes(input_size, mask_patch, model_patch)
        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"DATA.MASK_RATIO is {ratio}; use a fraction between 0 and 1, e.g. 0.6")
        self.cells = input_size // mask_patch
        self.scale = mask_patch // model_patch
        self.num_masked = int(math.ceil(self.cells * self.cells * ratio))

    def __call__(self) -> np.ndarray:
        chosen = np.random.permutation(self.cells * self.cells)[: self.num_masked]
        cells = np.zeros(self.cells * self.cells, dtype=np.int64)
        cells[chosen] = 1
        grid = cells.reshape(self.cells, self.cells)
        return grid.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


def check_mask_sizes(input_size: int, mask_patch: int, model_patch: int, stride: int | None = None) -> None:
    """One-line ``UserError`` unless the image splits into mask patches, a mask patch into model
    patches, and (with ``stride``, the encoder's output stride) the image into stride cells."""
    if mask_patch < 1 or model_patch < 1:
        raise UserError(f"DATA.MASK_PATCH_SIZE ({mask_patch}) and the model patch ({model_patch}) must be positive")
    if mask_patch % model_patch:
        fits = [m for m in range(model_patch, 2 * mask_patch + 1, model_patch) if input_size % m == 0][:4]
        raise UserError(
            f"DATA.MASK_PATCH_SIZE {mask_patch} is not a multiple of the model's patch size {model_patch}; "
            f"use a multiple of {model_patch} that divides DATA.IMG_SIZE {input_size}, e.g. {fits}"
        )
    if input_size % mask_patch:
        fits = [s for s in range(mask_patch, 8 * mask_patch + 1, mask_patch)][-4:]
        raise UserError(
            f"DATA.IMG_SIZE {input_size} is not divisible by DATA.MASK_PATCH_SIZE {mask_patch}; "
            f"use a multiple of {mask_patch} (e.g. {fits}) or another mask patch"
        )
    if stride and input_size % stride:
        raise UserError(
            f"DATA.IMG_SIZE {input_size} is not a multiple of the encoder's output stride {stride} (patch size "
            f"times 2 per patch merging), so the decoder cannot rebuild the image; use a multiple of {stride}"
        )


def encoder_stride(config: CfgNode) -> int:
    """Pixels per position of the last stage: patch size · 2 per patch merging."""
    s = model_section(config)
    return int(s.PATCH_SIZE) * 2 ** (len(s.DEPTHS) - 1)


class SimMIMTransform:
    """PIL image → (normalised image (3, S, S), token mask (S/P, S/P)).

    Training: the release's RandomResizedCrop(S, scale 0.67–1), horizontal flip (``reference``;
    ``image`` is its fast form under DATA.PIPELINE fast, same draws, whose image is a
    ``Uint8Image`` normalised per batch on the model's device). Evaluation:
    the classification eval crop (resize, centre crop) without randomness in the image; the
    mask is still random, seeded per image by the eval sampler so every run scores the same masks.
    """

    def __init__(self, config: CfgNode, is_train: bool) -> None:
        size = int(config.DATA.IMG_SIZE)
        patch = int(model_section(config).PATCH_SIZE)
        check_mask_sizes(size, int(config.DATA.MASK_PATCH_SIZE), patch, encoder_stride(config))
        if is_train:
            steps: list[Callable] = [
                transforms.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO),
                transforms.RandomHorizontalFlip(),
            ]
        else:
            steps = [transforms.Resize(int(256 / 224 * size)), transforms.CenterCrop(size)]
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
        self.reference = transforms.Compose(steps)
        # DATA.PIPELINE fast: the same crop draws, resized by torch's uint8 kernel (data/fast_transforms.py).
        fast = is_train and training_pipeline(config) == "fast"
        self.image = fast_compose(self.reference, uint8_output=True) if fast else self.reference
        self.mask = MaskGenerator(size, int(config.DATA.MASK_PATCH_SIZE), patch, float(config.DATA.MASK_RATIO))

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(img), torch.from_numpy(self.mask())


def image_files(root: str) -> list[str]:
    """Every image file under ``root`` (any depth, hidden folders skipped), sorted."""
    extensions = tuple(e.lower() for e in IMG_EXTENSIONS)
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(os.path.join(directory, f) for f in files if f.lower().endswith(extensions))
    return sorted(found)


class UnlabelledImages:
    """All images under a folder, with or without class sub-folders; every label is 0.

    Provides what ``RobustImageDataset`` reads (``samples``, ``loader``, ``transform``,
    ``target_transform``, ``classes``).
    """

    def __init__(self, root: str, transform: Callable) -> None:
        self.root = root
        self.samples = [(path, 0) for path in image_files(root)]
        self.loader = load_rgb
        self.transform = transform
        self.target_transform = None
        self.classes = ["image"]


def pretraining_folders(root: str) -> tuple[str, str | None]:
    """(train folder, val folder or None) of ``--data-path`` for pre-training.

    ``root/train`` (and ``root/val`` when present) if ``root`` has a ``train`` folder, else
    ``root`` itself with no validation set.
    """
    if not root:
        raise UserError("--data-path is not set; point it at a folder of images (any layout) for SimMIM pre-training")
    if not os.path.isdir(root):
        raise UserError(f"--data-path {root} does not exist; point it at a folder of images for SimMIM pre-training")
    train = os.path.join(root, "train")
    if os.path.isdir(train):
        val = os.path.join(root, "val")
        return train, (val if os.path.isdir(val) else None)
    return root, None


def build_pretraining_dataset(config: CfgNode, folder: str, is_train: bool) -> RobustImageDataset:
    """The images of ``folder`` with :class:`SimMIMTransform`; a folder without images is a ``UserError``."""
    base = UnlabelledImages(folder, SimMIMTransform(config, is_train))
    if not base.samples:
        raise UserError(
            f"{folder} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) for SimMIM pre-training; "
            "point --data-path at a folder with images (class sub-folders are optional)"
        )
    logger.info("%s set: %d unlabelled images from %s", "train" if is_train else "val", len(base.samples), folder)
    return RobustImageDataset(base, strict=bool(config.DATA.STRICT), substitute=is_train)
