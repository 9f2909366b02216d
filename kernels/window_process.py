"""Fused cyclic shift + window partition (and its inverse) for Swin Transformer blocks.

A shifted-window block does, in plain PyTorch::

    shifted = torch.roll(x, shifts=(-s, -s), dims=(1, 2))      # copy 1
    windows = window_partition(shifted, M)                      # view + permute + reshape: copy 2

and the mirror image after attention (``window_reverse`` then ``torch.roll`` by ``+s``).
The Triton kernel here folds the cyclic shift into the index arithmetic of the
partition, so each direction is a single gather: every output token computes where
its source token lives, and one program copies a tile of tokens x channels.

Triton is imported lazily (inside :func:`_get_kernel`), so importing this module never
needs a working Triton; the kernel is JIT-compiled on first use. On a CPU tensor the
kernel only runs under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported). :func:`try_fused_shift_partition` and :func:`try_fused_reverse_unshift` return
None where the kernel cannot run (or failed once, which switches it off for the process);
``models.windows`` then takes a PyTorch path, which gives identical results. This package
imports nothing from ``models``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "fused_shift_partition",
    "fused_reverse_unshift",
    "kernel_available",
    "try_fused_shift_partition",
    "try_fused_reverse_unshift",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Values of TRITON_INTERPRET that Triton itself treats as "on".
_TRUE_STRINGS = ("1", "true", "yes", "on", "y")


# ----------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_STRINGS


_TRITON_IMPORTABLE: bool | None = None


def _triton_importable() -> bool:
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORTABLE = True
        except Exception as exc:  # ImportError, or a broken install raising anything else
            logger.debug("triton is not importable: %r", exc)
            _TRITON_IMPORTABLE = False
    return _TRITON_IMPORTABLE


def kernel_available(t: torch.Tensor) -> bool:
    """True when Triton imports and ``t`` is on CUDA or ``TRITON_INTERPRET=1`` is set."""
    if not _triton_importable():
        return False
    return bool(getattr(t, "is_cuda", False)) or _interpret_requested()


# ----------------------------------------------------------------------------------------
# Triton kernel (built lazily, once per interpreter mode)
# ----------------------------------------------------------------------------------------

_KERNELS: dict[bool, Any] = {}


def _get_kernel() -> Any:
    """Define (and cache) the Triton kernel. ``triton.jit`` picks the interpreter when
    TRITON_INTERPRET is on at decoration time, so the cache is keyed on that flag."""
    interpret = _interpret_requested()
    kernel = _KERNELS.get(interpret)
    if kernel is not None:
        return kernel

    import triton
    import triton.language as tl

    @triton.jit
    def _window_gather_kernel(
        src_ptr,
        dst_ptr,
        n_tokens,
        H,
        W,
        C,
        shift_h,
        shift_w,
        M: tl.constexpr,
        REVERSE: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One program copies a BLOCK_T x BLOCK_C tile of destination tokens x channels.
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        tok = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        tok_mask = tok < n_tokens
        ch_mask = ch < C

        hw = H * W
        n_win_w = W // M
        b = tok // hw
        r = tok % hw
        if REVERSE:
            # Destination is the image (B, H, W, C) after rolling by +shift.
            # It reads merged[(h - sh) mod H, (w - sw) mod W] of the window tensor.
            h = r // W
            w = r % W
            hs = (h + H - shift_h) % H
            ws = (w + W - shift_w) % W
            win = (hs // M) * n_win_w + ws // M
            src_tok = (b * hw + win * (M * M)) + (hs % M) * M + ws % M
        else:
            # Destination is the window tensor (B * nW, M, M, C) of the image rolled by -shift.
            # Window token (window win, row i, col j) sits at (h, w) of the rolled image,
            # which is x[(h + sh) mod H, (w + sw) mod W].
            win = r // (M * M)
            p = r % (M * M)
            h = (win // n_win_w) * M + p // M
            w = (win % n_win_w) * M + p % M
            hs = (h + shift_h) % H
            ws = (w + shift_w) % W
            src_tok = b * hw + hs * W + ws

        mask = tok_mask[:, None] & ch_mask[None, :]
        src_off = src_tok[:, None] * C + ch[None, :]
        dst_off = tok[:, None] * C + ch[None, :]
        vals = tl.load(src_ptr + src_off, mask=mask)
        tl.store(dst_ptr + dst_off, vals, mask=mask)

    _KERNELS[interpret] = _window_gather_kernel
    logger.debug("built window-process Triton kernel (interpret=%s)", interpret)
    return _window_gather_kernel


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _block_sizes(C: int, interpret: bool) -> tuple[int, int]:
    block_c = min(_next_pow2(C), 128)
    # ~4K elements per tile on GPU; the interpreter pays per program, so use bigger tiles.
    budget = 16384 if interpret else 4096
    block_t = max(1, min(budget // block_c, 256))
    return block_t, block_c


def _check_common(t: torch.Tensor, window_size: int, H: int, W: int, what: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what}: dtype {t.dtype} is not supported (use float32, float16 or bfloat16)")
    if window_size <= 0:
        raise ValueError(f"{what}: window_size must be positive, got {window_size}")
    if H % window_size or W % window_size:
        raise ValueError(f"{what}: H={H} and W={W} must be multiples of window_size={window_size} (pad first)")


def _launch(src: torch.Tensor, dst: torch.Tensor, H: int, W: int, C: int, shift: int, M: int, reverse: bool) -> None:
    n_tokens = dst.numel() // C if C else 0
    if n_tokens == 0 or C == 0:
        return
    kernel = _get_kernel()
    interpret = _interpret_requested()
    block_t, block_c = _block_sizes(C, interpret)
    grid = (_cdiv(n_tokens, block_t), _cdiv(C, block_c))
    kernel[grid](
        src,
        dst,
        n_tokens,
        H,
        W,
        C,
        shift % H,
        shift % W,
        M=M,
        REVERSE=reverse,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
    )


def _shift_partition_forward(x: torch.Tensor, shift: int, M: int) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"fused_shift_partition: expected x of shape (B, H, W, C), got {tuple(x.shape)}")
    B, H, W, C = x.shape
    _check_common(x, M, H, W, "fused_shift_partition")
    x = x.contiguous()
    out = torch.empty((B * (H // M) * (W // M), M, M, C), dtype=x.dtype, device=x.device)
    _launch(x, out, H, W, C, int(shift), M, reverse=False)
    return out


def _reverse_unshift_forward(windows: torch.Tensor, shift: int, M: int, H: int, W: int) -> torch.Tensor:
    what = "fused_reverse_unshift"
    if windows.dim() != 4 or windows.shape[1] != M or windows.shape[2] != M:
        raise ValueError(f"{what}: expected windows of shape (B*nW, {M}, {M}, C), got {tuple(windows.shape)}")
    _check_common(windows, M, H, W, what)
    n_win = (H // M) * (W // M)
    if windows.shape[0] % n_win:
        raise ValueError(f"{what}: {windows.shape[0]} windows is not a multiple of nW={n_win} for H={H}, W={W}")
    B = windows.shape[0] // n_win
    C = windows.shape[3]
    windows = windows.contiguous()
    out = torch.empty((B, H, W, C), dtype=windows.dtype, device=windows.device)
    _launch(windows, out, H, W, C, int(shift), M, reverse=True)
    return out


class _FusedShiftPartition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: int, window_size: int) -> torch.Tensor:
        ctx.shift = shift
        ctx.window_size = window_size
        ctx.hw = (x.shape[1], x.shape[2])
        return _shift_partition_forward(x, shift, window_size)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        H, W = ctx.hw
        # The map is a permutation, so its gradient is the inverse permutation.
        grad_x = _FusedReverseUnshift.apply(grad_out, ctx.shift, ctx.window_size, H, W)
        return grad_x, None, None


class _FusedReverseUnshift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, windows: torch.Tensor, shift: int, window_size: int, H: int, W: int) -> torch.Tensor:
        ctx.shift = shift
        ctx.window_size = window_size
        return _reverse_unshift_forward(windows, shift, window_size, H, W)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_w = _FusedShiftPartition.apply(grad_out, ctx.shift, ctx.window_size)
        return grad_w, None, None, None, None


def fused_shift_partition(x: torch.Tensor, shift: int, window_size: int) -> torch.Tensor:
    """Triton: (B, H, W, C) -> (B * nW, M, M, C), equal to
    ``window_partition(torch.roll(x, (-shift, -shift), (1, 2)), window_size)``. Differentiable."""
    return _FusedShiftPartition.apply(x, int(shift), int(window_size))


def fused_reverse_unshift(windows: torch.Tensor, shift: int, window_size: int, H: int, W: int) -> torch.Tensor:
    """Triton: (B * nW, M, M, C) -> (B, H, W, C), the inverse of :func:`fused_shift_partition`.
    Differentiable."""
    return _FusedReverseUnshift.apply(windows, int(shift), int(window_size), int(H), int(W))


# ----------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------

# Set when the fused path failed for a reason other than bad input (e.g. Triton cannot
# compile for this GPU); from then on the PyTorch path is used for the rest of the process.
_FUSED_DISABLED = False


def _use_fused(t: torch.Tensor) -> bool:
    return not _FUSED_DISABLED and t.dtype in SUPPORTED_DTYPES and kernel_available(t)


def _disable_fused(exc: BaseException) -> None:
    global _FUSED_DISABLED
    _FUSED_DISABLED = True
    logger.warning(
        "fused window-process kernel failed (%s: %s); using the PyTorch path from now on",
        type(exc).__name__,
        exc,
    )


def try_fused_shift_partition(x: torch.Tensor, shift: int, window_size: int) -> torch.Tensor | None:
    """The kernel's shift + partition (B·nW, M, M, C), or None where it cannot run or has failed.

    Bad input (ValueError) and out-of-memory still raise: neither is the kernel's fault.
    """
    if not _use_fused(x):
        return None
    try:
        return fused_shift_partition(x, shift, window_size)
    except (ValueError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        _disable_fused(exc)
        return None


def try_fused_reverse_unshift(
    windows: torch.Tensor, shift: int, window_size: int, H: int, W: int
) -> torch.Tensor | None:
    """The kernel's window merge + reverse shift (B, H, W, C), or None (see above)."""
    if not _use_fused(windows):
        return None
    try:
        return fused_reverse_unshift(windows, shift, window_size, H, W)
    except (ValueError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        _disable_fused(exc)
        return None
