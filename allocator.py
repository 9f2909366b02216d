"""Keep freed memory in the process instead of handing it back to the OS (glibc only).

A process that allocates and frees the same large buffers again and again (a loader worker per
image: decode, resize, augment, 0.1-3 MB each; a CPU training step: activations and gradients,
tens of MB each) pays, under glibc's defaults, a page fault for every 4 KiB page of each one,
every time: glibc maps blocks above its mmap threshold with ``mmap`` and unmaps them on free, and
returns the free top of the heap to the OS past its trim threshold. In this VM that made torch's
resize and RandAugment's tensor shifts 20-50 % slower (1,100 faults per image), and a Swin-T
training step on the CPU (batch 16) took 67,000-166,000 faults and 0.4-0.8 s of kernel time
(README, "Performance"). The loader's processes keep their freed memory, and so does the main
process of a CPU run, training or inference (``keep_process_memory``), which holds its peak
working set each step anyway.

``retain_freed_memory`` changes this process's thresholds with ``mallopt``: blocks up to 32 MiB
come from the heap and up to 256 MiB of free heap is kept (what ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=268435456`` would set at start-up), or, with ``large_blocks``, no block is
mapped at all and the heap is never trimmed. The process then keeps about its peak working set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
NEVER_TRIM_BYTES = 2**31 - 1


def _glibc_mallopt():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        return None
    return getattr(libc, "mallopt", None)


def retain_freed_memory(large_blocks: bool = False) -> bool:
    """Raise this process's glibc mmap and trim thresholds; False where there is no glibc mallopt.

    ``large_blocks``: also serve blocks over 32 MiB from the heap and never trim it, for a
    process whose own tensors are that large (a model's activations on the CPU; the benchmark's
    ``--malloc keep``).
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # Both thresholds: setting either stops glibc adapting the other. mallopt returns 1 on success.
    if large_blocks:
        done = [mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES)]
    else:
        done = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)]
    return all(done)


def retain_freed_memory_in_worker(worker_id: int) -> None:
    """A ``DataLoader`` ``worker_init_fn``: ``retain_freed_memory`` in each loader worker."""
    if not retain_freed_memory() and worker_id == 0:
        logger.debug("RETAIN_FREED_MEMORY: no glibc mallopt here; the allocator keeps its defaults")


def keep_process_memory(device_type: str, enabled: bool, purpose: str) -> bool:
    """On a CPU (``device_type``), keep this process's freed memory from now on, large blocks
    too (``retain_freed_memory(large_blocks=True)``); whether it took.

    For a process whose model runs on the CPU: its activations (and, training, gradients) are
    allocated afresh every batch at about the same peak, so keeping that peak costs nothing the
    process did not use already. On a GPU the host allocator is not where the tensors live.
    """
    if not enabled or device_type != "cpu":
        return False
    kept = retain_freed_memory(large_blocks=True)
    if kept:
        logger.info("%s: freed memory kept in this process (RETAIN_FREED_MEMORY), no page faults per batch", purpose)
    return kept
