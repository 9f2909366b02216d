"""ImageNet-22K in the official annotation-list form (``ILSVRC2011fall_whole_map_*.txt``).

Each list file holds JSON: a list of ``[relative_path, label]`` pairs, paths relative to the
dataset root, labels in ``[0, 21841)``. The folder form (``train/`` and ``val/`` of class
folders) is read by ``ImageFolder`` in ``data/build.py`` instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from errors import UserError

from .robust import load_rgb

logger = logging.getLogger(__name__)

NUM_CLASSES_22K = 21841
ANNOTATION_PREFIX = "ILSVRC2011fall_whole"


def annotation_file(root: str, is_train: bool) -> str:
    """Path of the official annotation list of one split below ``root``."""
    split = "train" if is_train else "val"
    return os.path.join(root, f"{ANNOTATION_PREFIX}_map_{split}.txt")


def _as_label(value: Any) -> int | None:
    """An integer label, also from a string of digits (the official loader applies int()); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


class ImageNet22KList:
    """Samples listed in an official ImageNet-22K annotation file.

    Exposes the ``ImageFolder`` attributes the rest of the package relies on: ``samples``
    (``(absolute_path, label)`` pairs), ``targets``, ``classes`` (``str(i)`` for every one of the
    21,841 labels), ``class_to_idx``, ``loader``, ``transform``, ``target_transform`` and
    ``root``. ``__getitem__`` returns ``(transform(image), label)`` without guarding against
    unreadable files; wrap it in ``RobustImageDataset`` for that.
    """

    def __init__(
        self,
        root: str,
        ann_file: str,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        loader: Callable[[str], Any] = load_rgb,
    ) -> None:
        self.root = root
        self.ann_file = ann_file
        self.transform = transform
        self.target_transform = target_transform
        self.loader = loader
        self.classes = [str(i) for i in range(NUM_CLASSES_22K)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = self._read(ann_file)
        self.targets = [t for _, t in self.samples]

    def _read(self, ann_file: str) -> list[tuple[str, int]]:
        if not os.path.isfile(ann_file):
            raise UserError(
                f"ImageNet-22K annotation list {ann_file} does not exist; put it in --data-path "
                f"or use train/ and val/ class folders"
            )
        with open(ann_file) as f:
            try:
                entries = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{ann_file} is not valid JSON ({e.msg} at line {e.lineno}); it must hold a list of "
                    f"[relative_path, label] pairs"
                ) from e
        if not isinstance(entries, list) or not entries:
            raise UserError(f"{ann_file} must hold a non-empty JSON list of [relative_path, label] pairs")
        samples: list[tuple[str, int]] = []
        for i, entry in enumerate(entries):
            label = _as_label(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
            if label is None or not isinstance(entry[0], str):
                raise UserError(
                    f"entry {i} of {ann_file} is {json.dumps(entry)[:80]}; every entry must be "
                    f"[relative_path, integer_label]"
                )
            if not 0 <= label < NUM_CLASSES_22K:
                raise UserError(f"entry {i} of {ann_file} has label {label}; labels must lie in [0, {NUM_CLASSES_22K})")
            samples.append((os.path.join(self.root, entry[0]), label))
        logger.info("read %d samples from %s", len(samples), ann_file)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        img = self.loader(path)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target
