"""Per-sample augmentation seeds: the random crop, flip, RandAugment and erasing of a training
sample depend only on (SEED, epoch, position in the epoch), not on which loader worker drew it.

DataLoader workers each carry their own RNG streams, seeded once per iterator and consumed
in whatever order batches reach them. A run resumed mid-epoch restarts the workers at a new
batch, so without this the augmentation after the resume would differ from an uninterrupted
run's whenever ``DATA.NUM_WORKERS > 0``. With a seed per sample, a resumed run, a run with
another worker count and the uninterrupted run draw exactly the same augmented images.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of the SplitMix64 finalizer: nearby inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed (in ``[0, 2**32)``, NumPy's range) of the sample at ``position``
    of epoch ``epoch`` in a run seeded with ``seed``."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (epoch & _MASK64))
    h = _splitmix64(h ^ (position & _MASK64))
    return h >> 32


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed the CPU torch, Python ``random`` and NumPy global RNGs (the ones torchvision and timm
    transforms draw from) with ``seed`` inside the block, and put their previous states back
    after it, so the caller's own random stream (drop path, Mixup) is untouched.

    Only the CPU torch generator is touched (``torch.manual_seed`` would also reseed CUDA).
    """
    torch_state = torch.default_generator.get_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
