"""Custom kernels. Triton is imported lazily, so importing this package never needs it.

Nothing here imports from ``models``: the window plumbing (``models.windows``) calls in.
"""

from .window_process import (
    SUPPORTED_DTYPES,
    fused_reverse_unshift,
    fused_shift_partition,
    kernel_available,
    try_fused_reverse_unshift,
    try_fused_shift_partition,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "fused_reverse_unshift",
    "fused_shift_partition",
    "kernel_available",
    "try_fused_reverse_unshift",
    "try_fused_shift_partition",
]
