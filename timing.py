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
    settle_passes: int = 0  # untimed batches run after the warm-up until the page faults stopped


# A batch that faults in fewer fresh pages than this (4 MiB) is reusing its buffers.
QUIET_FAULTS_PER_BATCH = 1000
# Settling passes allowed on the CPU (--throughput, the benchmark's default, the model table):
# a Swin-T training step, the slowest to settle that was measured, took 4-5.
SETTLE_PASSES = 5


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far, all its threads; None where they can't be counted."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def settle_page_faults(
    steps: list[Callable[[], None]], device: torch.device, max_passes: int
) -> tuple[int, float | None]:
    """Untimed passes over ``steps`` (one batch each) on the CPU until a pass faults in fewer
    than ``QUIET_FAULTS_PER_BATCH`` pages per batch, at most ``max_passes``; (passes run, faults
    per batch in the last pass), (0, None) where nothing was run.

    Even with freed memory kept, a CPU process's heap grows over its first batches before freed
    blocks are reused (the benchmark's Swin-T training step, ours then timm's, batch 16, 2-core
    AVX2 EPYC: 487k and 192k faults in the warm-up batches, 129k, 32k, 37k and 49k in the first
    timed round, then 0 but for rare bursts), so a fixed warm-up left the first timed batches
    paying the kernel's page faults. Steps that share a heap (the benchmark's interleaved
    candidates) settle together, so a pass runs all of them.
    """
    if device.type != "cpu" or max_passes <= 0 or not steps or minor_page_faults() is None:
        return 0, None
    passes, per_batch = 0, None
    while passes < max_passes and (per_batch is None or per_batch >= QUIET_FAULTS_PER_BATCH):
        before = minor_page_faults()
        for step in steps:
            step()
        per_batch = (minor_page_faults() - before) / len(steps)
        passes += 1
    return passes, per_batch


def time_images_per_second(
    step: Callable[[], object],
    batch_size: int,
    device: torch.device,
    warmup: int = 3,
    iters: int = 10,
    min_seconds: float = 0.0,
    settle: int = 0,
) -> Timing:
    """Run ``step`` ``warmup`` times untimed, on the CPU up to ``settle`` more times until its
    page faults stop (``settle_page_faults``), then at least ``iters`` times (and ``min_seconds``)
    timed.

    ``step`` processes one batch of ``batch_size`` images; the device is synchronised around the
    timed region so asynchronous CUDA work is counted.
    """
    for _ in range(warmup):
        step()
    settle_passes, _ = settle_page_faults([step], device, settle)
    synchronize(device)
    start = time.perf_counter()
    n = 0
    while n < iters or time.perf_counter() - start < min_seconds:
        step()
        n += 1
    synchronize(device)
    elapsed = time.perf_counter() - start
    return Timing(
        images_per_s=batch_size * n / elapsed,
        seconds_per_iter=elapsed / n,
        batch_size=batch_size,
        iters=n,
        settle_passes=settle_passes,
    )
