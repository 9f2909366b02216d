"""Names of a classifier's outputs, for predictions people read."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

IMAGENET1K_CLASSES = 1000


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1K class names in the standard order (timm's shipped class lists)."""
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(info.num_classes())]
    except ImportError:
        # Older timm: the same lists, read from its package data.
        import timm

        folder = os.path.join(os.path.dirname(timm.__file__), "data", "_info")
        with open(os.path.join(folder, "imagenet_synsets.txt")) as f:
            synsets = f.read().split()
        lemmas: dict[str, str] = {}
        with open(os.path.join(folder, "imagenet_synset_to_lemma.txt")) as f:
            for line in f:
                wnid, _, lemma = line.rstrip("\n").partition("\t")
                lemmas[wnid] = lemma
        return [lemmas.get(w, w) for w in synsets]


def resolve_class_names(checkpoint: dict[str, Any], num_classes: int) -> list[str]:
    """Names of the ``num_classes`` outputs: the checkpoint's 'class_names', else ImageNet-1K's for a
    1,000-class model, else the indices as strings."""
    names = checkpoint.get("class_names") if isinstance(checkpoint, dict) else None
    if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return list(names)
    if names:
        logger.warning("checkpoint has %d class names for %d outputs; ignoring them", len(names), num_classes)
    if num_classes == IMAGENET1K_CLASSES:
        return imagenet_class_names()
    return [str(i) for i in range(num_classes)]
