"""Timing of forward passes and training steps: one definition for ``--throughput`` and the benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distributed import synchronize


@dataclass
class Timing:
    """Images per second of a timed callable, with what it was measured on."""

    images_per_s: float
    seconds_per_iter: float
    batch_size: int
    iters: int


def time_images_per_second(
    step: Callable[[], object],
    batch_size: int,
    device: torch.device,
    warmup: int = 3,
    iters: int = 10,
    min_seconds: float = 0.0,
) -> Timing:
    """Run ``step`` ``warmup`` times untimed, then at least ``iters`` times (and ``min_seconds``) timed.

    ``step`` processes one batch of ``batch_size`` images; the device is synchronised around the
    timed region so asynchronous CUDA work is counted.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    n = 0
    while n < iters or time.perf_counter() - start < min_seconds:
        step()
        n += 1
    synchronize(device)
    elapsed = time.perf_counter() - start
    return Timing(images_per_s=batch_size * n / elapsed, seconds_per_iter=elapsed / n, batch_size=batch_size, iters=n)
