"""Custom kernels. Triton is imported lazily, so importing this package never needs it."""

from .window_process import (
    SUPPORTED_DTYPES,
    fused_reverse_unshift,
    fused_shift_partition,
    kernel_available,
    reverse_unshift,
    shift_partition,
    torch_reverse_unshift,
    torch_shift_partition,
    window_partition,
    window_reverse,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "fused_reverse_unshift",
    "fused_shift_partition",
    "kernel_available",
    "reverse_unshift",
    "shift_partition",
    "torch_reverse_unshift",
    "torch_shift_partition",
    "window_partition",
    "window_reverse",
]
