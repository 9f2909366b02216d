"""Window machinery shared by Swin V1 and V2: one definition of every piece of tensor plumbing.

Both families attend inside M×M windows that shift by ⌊M/2⌋ every second block (V1 §3.2,
V2 §3.1 keeps it). Here, and only here, live: window partition and reverse, the relative position
index of a window, the shift mask (V1 Fig. 4), padding to the window, the cyclic shift + partition
as one token gather, and :class:`WindowBlockBase`, the (S)W-MSA plumbing a block wraps around its
attention module. The choice between the three ways of shifting and partitioning (the Triton
kernel, the gather, ``torch.roll`` + partition) is made once, in :func:`shift_partition` and
:func:`reverse_unshift`.

This module imports nothing from the model files; ``kernels`` imports nothing from ``models``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import try_fused_reverse_unshift, try_fused_shift_partition

# The official release blocks cross-window attention with -100 rather than -inf, so that a fully
# masked row (impossible here, but cheap to be safe) never produces NaN.
MASK_VALUE = -100.0
# What V1 blocks use instead: still finite (in fp16 too), but far enough below any logit that
# exp() of a masked entry underflows to exactly 0. With -100, a masked weight is e^-100 times the
# row's largest, about 1e-44: a subnormal float, which x86 CPUs multiply through a microcode
# assist; the products over those weights ran 5-10x slower, and a Swin-T training step on a
# 2-core Xeon went from 3.98 to 3.58 s. The outputs are unchanged unless a masked logit exceeds
# every unmasked one in its row by some 80 (then -100 lets it through); V1's logits are not scaled
# up, while V2's reach ±116 (cosine × up to 100), so V2 keeps the release's value.
UNDERFLOW_MASK_VALUE = -1.0e4


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split a feature map into non-overlapping windows.

    Args:
        x: (B, H, W, C) with H and W multiples of ``window_size``.
        window_size: M.
    Returns:
        (B * H/M * W/M, M, M, C); windows row-major over the window grid, image by image.
    """
    B, H, W, C = x.shape
    M = window_size
    x = x.view(B, H // M, M, W // M, M, C)
    # .contiguous(): with B == 1 and a single row of windows (H == M, W > M) reshape returns a
    # non-contiguous view, and callers' .view(-1, M*M, C) then fails (e.g. Swin-T on one 224×448
    # image: stage 4 is 7×14). A no-op whenever reshape already copied.
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, M, M, C).contiguous()


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: (B * H/M * W/M, M, M, C).
        window_size: M.
        H, W: the feature map's height and width (multiples of M).
    Returns:
        (B, H, W, C).
    """
    M = window_size
    C = windows.shape[-1]
    x = windows.reshape(-1, H // M, W // M, M, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index of each (query, key) token pair of a window into a (2M-1)² bias table.

    The relative offset (dy, dx) of two tokens of an M×M window lies in [-(M-1), M-1]²; it is
    shifted to [0, 2M-2]² and flattened row-major into the (2M-1)² rows of the table (V1's learned
    table, V2's table computed by the position-bias MLP).

    Returns:
        (M², M²) long tensor with values in [0, (2M-1)² - 1].
    """
    M = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)  # 2, M²
    rel = coords[:, :, None] - coords[:, None, :]  # 2, M², M²
    rel = rel + (M - 1)
    return rel[0] * (2 * M - 1) + rel[1]


def shift_attention_mask(
    height: int, width: int, window_size: int, shift_size: int, mask_value: float = MASK_VALUE
) -> torch.Tensor | None:
    """Mask that keeps attention inside each sub-window after the cyclic shift (V1 Fig. 4).

    After rolling the map by (-s, -s), a window at the bottom or right edge holds tokens that were
    far apart in the image. Tokens are labelled by the region they came from (3×3 regions cut at
    -M and -s along each axis); pairs with different labels get ``mask_value``.

    Args:
        height, width: the (padded) feature map size, multiples of ``window_size``.
        window_size: M.
        shift_size: s; 0 gives None (no mask is needed).
        mask_value: the additive value of a blocked pair (the release's -100 by default).
    Returns:
        (nW, M², M²) float tensor of 0 and ``mask_value``, nW = height/M * width/M; or None.
    """
    if shift_size == 0:
        return None
    M, s = window_size, shift_size
    labels = torch.zeros(1, height, width, 1)
    region = 0
    for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            labels[:, hs, ws, :] = region
            region += 1
    windows = window_partition(labels, M).view(-1, M * M)  # nW, M²
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, mask_value)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the bottom and right to multiples of ``multiple``."""
    _, H, W, _ = x.shape
    pad_h = (multiple - H % multiple) % multiple
    pad_w = (multiple - W % multiple) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def stage_window_and_shift(resolution: int, window_size: int) -> tuple[int, bool]:
    """The release's rule (V1 and V2): a stage no larger than the window uses one whole-map window,
    unshifted.

    Returns:
        (window size for the stage, whether its odd blocks shift).
    """
    if resolution <= window_size:
        return resolution, False
    return window_size, True


# ---------------------------------------------------------------------------------------------
# Cyclic shift + partition: the reference (roll, then partition) and the gather
# ---------------------------------------------------------------------------------------------
def roll_shift_partition(x: torch.Tensor, shift: int, window_size: int) -> torch.Tensor:
    """Reference: ``window_partition(torch.roll(x, (-s, -s), (1, 2)), M)``.

    (B, H, W, C) → (B·nW, M, M, C).
    """
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(x, window_size)


def roll_reverse_unshift(windows: torch.Tensor, shift: int, window_size: int, H: int, W: int) -> torch.Tensor:
    """Reference: ``torch.roll(window_reverse(windows, M, H, W), (s, s), (1, 2))``.

    (B·nW, M, M, C) → (B, H, W, C).
    """
    x = window_reverse(windows, window_size, H, W)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x


# ``torch.roll`` on CPU is two narrow+cat copies (one per axis) and the partition a third; a
# precomputed token permutation does all of it in a single ``index_select`` (~5x less time than
# roll+partition for Swin-T stage 1 on the CPU here).
# (perm, inverse): the token order of the shifted windows and its inverse, each (H·W,) int64.
Permutation = tuple[torch.Tensor, torch.Tensor]
_PERMUTATIONS: dict[tuple, Permutation] = {}
_MASKS: dict[tuple, torch.Tensor] = {}
# Past this many entries a cache starts again (many image sizes in one process, e.g. detection).
_CACHE_LIMIT = 64


# A block keeps the permutation and mask of the map size its model is built for as buffers
# (WindowBlockBase); these caches serve other sizes. Under torch.compile they neither read nor fill
# the cache but build in the graph: a cache read traced by Dynamo guards on the cache's contents,
# and a first call that fills the cache fails that guard (a second compile).
def _cached(cache: dict, key: tuple, build: Callable[[], Any]) -> Any:
    """``cache[key]``, built by ``build()`` on first use outside inference mode (training reuses
    it); under torch.compile ``build()`` every time, the cache neither read nor filled."""
    if torch.compiler.is_compiling():
        return build()
    hit = cache.get(key)
    if hit is None:
        with torch.inference_mode(False):
            hit = build()
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        cache[key] = hit
    return hit


def window_permutation(height: int, width: int, window_size: int, shift_size: int, device: torch.device) -> Permutation:
    """(perm, inverse) of the H·W tokens of a map for shift ``s`` and window ``M``, cached.

    ``x.flatten(1, 2)[:, perm]`` equals ``window_partition(torch.roll(x, (-s, -s), (1, 2)), M)``
    flattened to (B, H·W, C); ``inverse`` undoes it (window reverse, then roll by +s).
    """
    key = (height, width, window_size, shift_size, str(device))
    return _cached(_PERMUTATIONS, key, lambda: _build_permutation(height, width, window_size, shift_size, device))


def _build_permutation(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> Permutation:
    index = torch.arange(height * width, device=device).view(1, height, width, 1)
    if shift_size:
        index = torch.roll(index, shifts=(-shift_size, -shift_size), dims=(1, 2))
    perm = window_partition(index, window_size).reshape(-1)
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=device))
    return perm, inverse


def cached_shift_mask(
    height: int, width: int, window_size: int, shift_size: int, mask_value: float, device: torch.device
) -> torch.Tensor:
    """:func:`shift_attention_mask` (``shift_size`` > 0) on ``device``, built once per arguments."""
    key = (height, width, window_size, shift_size, mask_value, str(device))
    return _cached(
        _MASKS, key, lambda: shift_attention_mask(height, width, window_size, shift_size, mask_value).to(device)
    )


class _PermuteTokens(torch.autograd.Function):
    """``x.index_select(1, perm)`` whose backward is the inverse gather (not a scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        # Constant index tensors: kept on ctx, not save_for_backward (nothing to version-check).
        ctx.perm, ctx.inverse = perm, inverse
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _PermuteTokens.apply(grad, ctx.inverse, ctx.perm), None, None


def gather_shift_partition(
    x: torch.Tensor, shift_size: int, window_size: int, permutation: Permutation | None = None
) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, M², C): cyclic shift by -s and window partition in one gather.

    Equal (exactly) to ``window_partition(torch.roll(x, (-s, -s), (1, 2)), M).view(-1, M², C)``.
    ``permutation``: :func:`window_permutation`'s result for this map, if the caller holds it.
    """
    B, H, W, C = x.shape
    perm, inverse = permutation or window_permutation(H, W, window_size, shift_size, x.device)
    return _PermuteTokens.apply(x.reshape(B, H * W, C), perm, inverse).view(-1, window_size * window_size, C)


def gather_reverse_unshift(
    windows: torch.Tensor, shift_size: int, window_size: int, H: int, W: int, permutation: Permutation | None = None
) -> torch.Tensor:
    """(B·nW, M², C) → (B, H, W, C): the inverse of :func:`gather_shift_partition`."""
    C = windows.shape[-1]
    perm, inverse = permutation or window_permutation(H, W, window_size, shift_size, windows.device)
    return _PermuteTokens.apply(windows.reshape(-1, H * W, C), inverse, perm).view(-1, H, W, C)


def shift_partition(
    x: torch.Tensor,
    shift: int,
    window_size: int,
    fused: bool = False,
    gather: bool = True,
    permutation: Permutation | None = None,
) -> torch.Tensor:
    """Cyclic shift by -s, then window partition: (B, H, W, C) → (B·nW, M², C).

    The one place that picks the implementation: the Triton kernel when ``fused`` and it can run
    (CUDA, or Triton's interpreter), else the token gather for shifted windows (``gather``), else
    ``torch.roll`` + partition. All three give identical results. ``permutation``: the gather's
    index for this map, if the caller holds it (else looked up).
    """
    M, C = window_size, x.shape[-1]
    if fused:
        out = try_fused_shift_partition(x, shift, M)
        if out is not None:
            return out.view(-1, M * M, C)
    if shift and gather:
        return gather_shift_partition(x, shift, M, permutation)
    return roll_shift_partition(x, shift, M).view(-1, M * M, C)


def reverse_unshift(
    windows: torch.Tensor,
    shift: int,
    window_size: int,
    H: int,
    W: int,
    fused: bool = False,
    gather: bool = True,
    permutation: Permutation | None = None,
) -> torch.Tensor:
    """Inverse of :func:`shift_partition`: (B·nW, M², C) → (B, H, W, C), same choice of path."""
    M, C = window_size, windows.shape[-1]
    if fused:
        out = try_fused_reverse_unshift(windows.view(-1, M, M, C), shift, M, H, W)
        if out is not None:
            return out
    if shift and gather:
        return gather_reverse_unshift(windows, shift, M, H, W, permutation)
    return roll_reverse_unshift(windows.view(-1, M, M, C), shift, M, H, W)


# ---------------------------------------------------------------------------------------------
# The (S)W-MSA plumbing of a block
# ---------------------------------------------------------------------------------------------
class WindowBlockBase(nn.Module):
    """What V1 and V2 blocks share around their attention: pad the map to the window, shift and
    partition it, attend in each window (``self.attn(windows, mask=mask)``), then undo it all.

    Subclasses call :meth:`_init_windows` and set ``dim``, ``mlp_ratio`` and ``attn``.
    """

    # Shifted blocks: roll + partition (and the reverse) as one gather each. A switch for the
    # benchmark; both give identical results.
    gather_partition: bool = True
    # The additive value of blocked pairs in the shift mask (V1 overrides it; see
    # UNDERFLOW_MASK_VALUE).
    mask_value: float = MASK_VALUE
    dim: int
    mlp_ratio: float
    window_size: int
    shift_size: int
    fused_window_process: bool
    attn: Callable[..., torch.Tensor]

    def _init_windows(
        self,
        window_size: int,
        shift_size: int,
        fused_window_process: bool,
        resolution: tuple[int, int] | None = None,
    ) -> None:
        """``resolution``: the (H, W) map the block sees in the model as built, if known. A shifted
        block then holds that map's shift mask and token permutation as buffers (not saved in
        checkpoints), as the release and timm hold their mask: under torch.compile they are graph
        inputs like the weights, where a cache lookup would add guards and a second compile."""
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.fused_window_process = fused_window_process
        self.own_map: tuple[int, int] | None = None
        if shift_size and resolution is not None:
            M = window_size
            self.own_map = (math.ceil(resolution[0] / M) * M, math.ceil(resolution[1] / M) * M)
            self.own_mask_value = self.mask_value
            mask = shift_attention_mask(*self.own_map, M, shift_size, self.mask_value)
            perm, inverse = _build_permutation(*self.own_map, M, shift_size)
            self.register_buffer("shift_mask", mask, persistent=False)
            self.register_buffer("token_permutation", perm, persistent=False)
            self.register_buffer("token_inverse", inverse, persistent=False)

    def attention_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        """The shift mask for a padded map of ``height`` × ``width`` (the block's buffer, or cached
        per size), or None in a block without shift."""
        if not self.shift_size:
            return None
        if self.own_map == (height, width) and self.own_mask_value == self.mask_value:
            return self.shift_mask
        return cached_shift_mask(height, width, self.window_size, self.shift_size, self.mask_value, device)

    def permutation(self, height: int, width: int) -> Permutation | None:
        """The token gather's index for a padded map of ``height`` × ``width`` when the block holds
        it (its own map size), else None (looked up by the gather)."""
        if self.own_map == (height, width):
            return self.token_permutation, self.token_inverse
        return None

    def flops(self, height: int, width: int) -> int:
        """Multiply-accumulates of the block on an ``height`` × ``width`` map, as the release counts
        (two norms, the attention of every window, the MLP)."""
        M = self.window_size
        n_windows = math.ceil(height / M) * math.ceil(width / M)
        flops = self.dim * height * width  # norm1
        flops += n_windows * self.attn.flops(M * M)
        flops += 2 * height * width * self.dim * self.dim * self.mlp_ratio
        flops += self.dim * height * width  # norm2
        return int(flops)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """(S)W-MSA on a (B, H, W, C) map, returning the same shape."""
        _, H, W, _ = x.shape
        M, s = self.window_size, self.shift_size
        x = pad_to_multiple(x, M)
        Hp, Wp = x.shape[1], x.shape[2]
        mask = self.attention_mask(Hp, Wp, x.device)
        fused, gather, perm = self.fused_window_process, self.gather_partition, self.permutation(Hp, Wp)
        windows = self.attn(shift_partition(x, s, M, fused, gather, perm), mask=mask)
        x = reverse_unshift(windows, s, M, Hp, Wp, fused, gather, perm)
        if Hp != H or Wp != W:
            x = x[:, :H, :W, :].contiguous()
        return x
