"""Swin Transformer V1 (Liu et al., ICCV 2021), laid out as the paper's Section 3.

Tensor plumbing lives in small pure functions (window partition and reverse, the relative
position index, the shift mask); modules map onto the paper: ``PatchEmbed`` (patch partition
and linear embedding, §3.1), ``WindowAttention`` (W-MSA with relative position bias, §3.2,
Eq. 4), ``SwinTransformerBlock`` (Eq. 3, regular or shifted windows), ``PatchMerging`` (§3.1)
and ``SwinTransformer`` (the variants of §3.3). Parameter names and shapes are those of the
official release, so its checkpoints load unchanged.

Feature maps flow between modules as (B, H, W, C), which lets any input size through: blocks
pad to a multiple of the window and crop afterwards, as the released detection backbones do.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from timm.layers import DropPath, trunc_normal_

from kernels import kernel_available, reverse_unshift, shift_partition

# WindowAttention implementations (MODEL.SWIN.ATTN_IMPL); 'auto' picks per device and mode.
ATTN_IMPLS = ("auto", "sdpa", "reference")

# The official release blocks cross-window attention with -100 rather than -inf, so that a fully
# masked row (impossible here, but cheap to be safe) never produces NaN.
MASK_VALUE = -100.0


# ---------------------------------------------------------------------------------------------
# Tensor plumbing
# ---------------------------------------------------------------------------------------------
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
    """Index of each (query, key) token pair of a window into the bias table.

    The relative offset (dy, dx) of two tokens of an M×M window lies in [-(M-1), M-1]²; it is
    shifted to [0, 2M-2]² and flattened row-major into the (2M-1)² rows of the table.

    Returns:
        (M², M²) long tensor with values in [0, (2M-1)² - 1].
    """
    M = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)  # 2, M²
    rel = coords[:, :, None] - coords[:, None, :]  # 2, M², M²
    rel = rel + (M - 1)
    return rel[0] * (2 * M - 1) + rel[1]


def shift_attention_mask(height: int, width: int, window_size: int, shift_size: int) -> Optional[torch.Tensor]:
    """Mask that keeps attention inside each sub-window after the cyclic shift (paper Fig. 4).

    After rolling the map by (-s, -s), a window at the bottom or right edge holds tokens that were
    far apart in the image. Tokens are labelled by the region they came from (3×3 regions cut at
    -M and -s along each axis); pairs with different labels get ``MASK_VALUE``.

    Args:
        height, width: the (padded) feature map size, multiples of ``window_size``.
        window_size: M.
        shift_size: s; 0 gives None (no mask is needed).
    Returns:
        (nW, M², M²) float tensor of 0 and ``MASK_VALUE``, nW = height/M * width/M; or None.
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
    return torch.zeros(different.shape).masked_fill(different, MASK_VALUE)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the bottom and right to multiples of ``multiple``."""
    _, H, W, _ = x.shape
    pad_h = (multiple - H % multiple) % multiple
    pad_w = (multiple - W % multiple) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


# Cyclic shift + window partition as ONE gather. ``torch.roll`` on CPU is two narrow+cat copies
# (one per axis) and the partition a third; a precomputed token permutation does all of it in a
# single ``index_select`` (~5x less time than roll+partition for Swin-T stage 1 on the CPU here).
_PERMUTATIONS: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def window_permutation(height: int, width: int, window_size: int, shift_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) of the H·W tokens of a map for shift ``s`` and window ``M``, cached.

    ``x.flatten(1, 2)[:, perm]`` equals ``window_partition(torch.roll(x, (-s, -s), (1, 2)), M)``
    flattened to (B, H·W, C); ``inverse`` undoes it (window reverse, then roll by +s).
    """
    key = (height, width, window_size, shift_size, str(device))
    hit = _PERMUTATIONS.get(key)
    if hit is None:
        # Normal tensors even when first built under inference_mode: training reuses them.
        with torch.inference_mode(False):
            index = torch.arange(height * width).view(1, height, width, 1)
            if shift_size:
                index = torch.roll(index, shifts=(-shift_size, -shift_size), dims=(1, 2))
            perm = window_partition(index, window_size).reshape(-1)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel())
            hit = (perm.to(device), inverse.to(device))
        if len(_PERMUTATIONS) > 64:
            _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = hit
    return hit


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


def gather_shift_partition(x: torch.Tensor, shift_size: int, window_size: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, M², C): cyclic shift by -s and window partition in one gather.

    Equal (exactly) to ``window_partition(torch.roll(x, (-s, -s), (1, 2)), M).view(-1, M², C)``.
    """
    B, H, W, C = x.shape
    perm, inverse = window_permutation(H, W, window_size, shift_size, x.device)
    return _PermuteTokens.apply(x.reshape(B, H * W, C), perm, inverse).view(-1, window_size * window_size, C)


def gather_reverse_unshift(windows: torch.Tensor, shift_size: int, window_size: int, H: int, W: int) -> torch.Tensor:
    """(B·nW, M², C) → (B, H, W, C): the inverse of :func:`gather_shift_partition`."""
    C = windows.shape[-1]
    perm, inverse = window_permutation(H, W, window_size, shift_size, windows.device)
    return _PermuteTokens.apply(windows.reshape(-1, H * W, C), inverse, perm).view(-1, H, W, C)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """The block's feed-forward network: Linear(C, rC), GELU, Linear(rC, C)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if not x.requires_grad and type(self.act) is nn.GELU:
            # Inference: GELU in place on fc1's fresh output (same kernel, same numbers) spares
            # allocating another rC-wide activation.
            x = torch.ops.aten.gelu_(x, approximate=self.act.approximate)
        else:
            x = self.act(x)
        return self.drop(self.fc2(self.drop(x)))


class PatchEmbed(nn.Module):
    """Patch partition and linear embedding (§3.1) as one stride-P convolution.

    (B, in_chans, H, W) → (B, ⌈H/P⌉, ⌈W/P⌉, embed_dim); sides that are not multiples of P are
    zero-padded first.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        P = self.patch_size
        if H % P or W % P:
            x = F.pad(x, (0, (P - W % P) % P, 0, (P - H % P) % P))
        x = self.proj(x).permute(0, 2, 3, 1)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def flops(self, height: int, width: int) -> int:
        Ho, Wo = math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)
        flops = Ho * Wo * self.embed_dim * self.in_chans * self.patch_size**2
        if self.norm is not None:
            flops += Ho * Wo * self.embed_dim
        return flops


class WindowAttention(nn.Module):
    """Multi-head self-attention inside M×M windows with relative position bias (§3.2).

    Attention(Q, K, V) = SoftMax(QKᵀ/√d + B + mask) V (Eq. 4), B gathered per head from a learned
    table of (2M-1)² rows by :func:`relative_position_index`.

    Two implementations give the same answer: ``'reference'`` spells Eq. 4 out, ``'sdpa'`` folds
    B and the mask into ``attn_mask`` of ``scaled_dot_product_attention``. ``'auto'`` picks the
    faster one per call: sdpa on CUDA and for CPU inference (its fused CPU kernel, fed strided
    q/k/v without copies, beats matmul+softmax for 49-token windows), the reference math for CPU
    training (with a bias that needs a gradient, CPU sdpa falls back to a slower math path).
    """

    # Eval-mode cache of the summed bias + mask (see ``_attn_bias``); a switch for the benchmark.
    cache_eval_bias: bool = True

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        use_rpb: bool = True,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {attn_impl!r}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.use_rpb = use_rpb
        self.attn_impl = attn_impl
        self.attn_drop_p = attn_drop

        if use_rpb:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from the window size, so rebuilt rather than stored in checkpoints.
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Eval-mode cache of bias (+ mask) per padded map size; keyed on the table's version so an
        # optimizer step or a load invalidates it.
        self._bias_cache: Dict[tuple, torch.Tensor] = {}

    def relative_position_bias(self) -> torch.Tensor:
        """B of Eq. 4: (num_heads, M², M²)."""
        N = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, -1).permute(2, 0, 1).contiguous()

    def _attn_bias(self, mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Bias and mask summed: (nW, heads, N, N), (1, heads, N, N) or None."""
        if not self.use_rpb and mask is None:
            return None
        cacheable = (
            self.cache_eval_bias and not torch.is_grad_enabled() and not torch.jit.is_tracing() and not _is_compiling()
        )
        key = None
        if cacheable:
            version = self.relative_position_bias_table._version if self.use_rpb else 0
            key = (None if mask is None else (mask.shape, mask.data_ptr()), dtype, version)
            hit = self._bias_cache.get(key)
            if hit is not None:
                return hit
        bias = self.relative_position_bias().unsqueeze(0) if self.use_rpb else None
        if mask is not None:
            mask = mask.unsqueeze(1)
            bias = mask if bias is None else bias + mask
        bias = bias.to(dtype)
        if cacheable:
            if len(self._bias_cache) > 8:
                self._bias_cache.clear()
            self._bias_cache[key] = bias
        return bias

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: (B·nW, N, C) tokens of each window, N = M².
            mask: (nW, N, N) of 0 / ``MASK_VALUE`` for shifted windows, or None.
        Returns:
            (B·nW, N, C).
        """
        B_, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B_, h, N, d
        nW = 1 if mask is None else mask.shape[0]
        bias = self._attn_bias(mask, q.dtype)  # nW or 1, h, N, N
        impl = self.attn_impl
        if impl == "auto":
            impl = "reference" if x.device.type == "cpu" and torch.is_grad_enabled() else "sdpa"
        if impl == "reference":
            attn = (q * self.scale) @ k.transpose(-2, -1)  # B_, h, N, N
            if bias is not None:
                attn = attn.view(B_ // nW, nW, h, N, N) + bias.unsqueeze(0)
                attn = attn.view(B_, h, N, N)
            attn = attn.softmax(dim=-1)
            attn = F.dropout(attn, self.attn_drop_p, self.training)
            out = attn @ v
        elif nW == 1 or x.device.type == "cpu":
            # q, k, v go in as strided views of qkv (no copies). One bias for all windows
            # broadcasts; a per-window bias is expanded over the batch, which on the CPU is
            # cheaper than the q/k/v copies of the folded layout below.
            if bias is not None and nW > 1:
                bias = bias.unsqueeze(0).expand(B_ // nW, nW, h, N, N).reshape(B_, h, N, N)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop_p if self.training else 0.0, scale=self.scale
            )
        else:
            # Windows of one image share the mask: fold windows into the head axis so the bias
            # broadcasts over the batch instead of being expanded B times.
            shape = (B_ // nW, nW * h, N, -1)
            bias4 = None if bias is None else bias.expand(nW, h, N, N).reshape(1, nW * h, N, N)
            out = F.scaled_dot_product_attention(
                q.reshape(shape),
                k.reshape(shape),
                v.reshape(shape),
                attn_mask=bias4,
                dropout_p=self.attn_drop_p if self.training else 0.0,
                scale=self.scale,
            ).view(B_, h, N, -1)
        x = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))

    def flops(self, N: int) -> int:
        """Multiply-accumulates for one window of N tokens (as the official release counts)."""
        d = self.dim // self.num_heads
        return N * self.dim * 3 * self.dim + 2 * self.num_heads * N * N * d + N * self.dim * self.dim


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class SwinTransformerBlock(nn.Module):
    """One Swin block (Eq. 3): ẑ = (S)W-MSA(LN(z)) + z;  z' = MLP(LN(ẑ)) + ẑ.

    With ``shift_size`` > 0 the map is cyclically shifted by (-s, -s) before window attention
    and the shift mask keeps attention inside each sub-window (SW-MSA); otherwise W-MSA.
    """

    # Shifted blocks: roll + partition (and the reverse) as one gather each. A switch for the
    # benchmark; both give identical results.
    gather_partition: bool = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        use_rpb: bool = True,
        attn_impl: str = "auto",
        fused_window_process: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        self.fused_window_process = fused_window_process
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop, use_rpb, attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self._mask_cache: Dict[tuple, Optional[torch.Tensor]] = {}

    def attention_mask(self, height: int, width: int, device: torch.device) -> Optional[torch.Tensor]:
        """The shift mask for a padded map of ``height`` × ``width`` (cached per size)."""
        key = (height, width, device)
        if key not in self._mask_cache:
            mask = shift_attention_mask(height, width, self.window_size, self.shift_size)
            self._mask_cache[key] = None if mask is None else mask.to(device)
        return self._mask_cache[key]

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """(S)W-MSA on a (B, H, W, C) map, returning the same shape."""
        B, H, W, C = x.shape
        M, s = self.window_size, self.shift_size
        x = _pad_to_multiple(x, M)
        Hp, Wp = x.shape[1], x.shape[2]
        mask = self.attention_mask(Hp, Wp, x.device)
        if self.fused_window_process and kernel_available(x):  # Triton kernel (CUDA)
            windows = shift_partition(x, s, M, True).view(-1, M * M, C)
            windows = self.attn(windows, mask=mask)
            x = reverse_unshift(windows.view(-1, M, M, C), s, M, Hp, Wp, True)
        elif s and self.gather_partition:
            windows = self.attn(gather_shift_partition(x, s, M), mask=mask)
            x = gather_reverse_unshift(windows, s, M, Hp, Wp)
        else:
            windows = shift_partition(x, s, M).view(-1, M * M, C)
            windows = self.attn(windows, mask=mask)
            x = reverse_unshift(windows.view(-1, M, M, C), s, M, Hp, Wp)
        if Hp != H or Wp != W:
            x = x[:, :H, :W, :].contiguous()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        # Residual sums in place into each branch's output, a fresh tensor of this block whose
        # backward needs no saved copy of it: one large allocation fewer per branch.
        x = self.drop_path(self._attention(self.norm1(x))).add_(x)
        return self.drop_path(self.mlp(self.norm2(x))).add_(x)

    def flops(self, height: int, width: int) -> int:
        M = self.window_size
        n_windows = math.ceil(height / M) * math.ceil(width / M)
        flops = self.dim * height * width  # norm1
        flops += n_windows * self.attn.flops(M * M)
        flops += 2 * height * width * self.dim * self.dim * self.mlp_ratio
        flops += self.dim * height * width  # norm2
        return int(flops)


class PatchMerging(nn.Module):
    """Patch merging (§3.1): each 2×2 neighbourhood concatenated (4C), LayerNorm, Linear 4C→2C.

    (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C); odd sides are zero-padded first. The concatenation
    order (top-left, bottom-left, top-right, bottom-right) is the release's, which its weights
    depend on.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))

    def flops(self, height: int, width: int) -> int:
        return height * width * self.dim + math.ceil(height / 2) * math.ceil(width / 2) * 4 * self.dim * 2 * self.dim


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating W-MSA and SW-MSA, then (optionally) patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        downsample: bool = False,
        use_checkpoint: bool = False,
        shift: bool = True,
        use_rpb: bool = True,
        attn_impl: str = "auto",
        fused_window_process: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            [
                SwinTransformerBlock(
                    dim=dim,
                    num_heads=num_heads,
                    window_size=window_size,
                    shift_size=window_size // 2 if (shift and i % 2 == 1) else 0,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    use_rpb=use_rpb,
                    attn_impl=attn_impl,
                    fused_window_process=fused_window_process,
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks without the merging: (B, H, W, C) → (B, H, W, C)."""
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch_checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x

    def flops(self, height: int, width: int) -> int:
        flops = sum(blk.flops(height, width) for blk in self.blocks)
        if self.downsample is not None:
            flops += self.downsample.flops(height, width)
        return flops


def stage_window_and_shift(resolution: int, window_size: int) -> Tuple[int, bool]:
    """The release's rule: a stage no larger than the window uses one whole-map window, unshifted.

    Returns:
        (window size for the stage, whether its odd blocks shift).
    """
    if resolution <= window_size:
        return resolution, False
    return window_size, True


class SwinTrunk(nn.Module):
    """Patch embedding, optional absolute position embedding and the four stages.

    Shared by the classifier (:class:`SwinTransformer`) and the dense-prediction backbone.
    """

    def __init__(
        self,
        img_size: int | Tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        shift: bool = True,
        use_rpb: bool = True,
        attn_impl: str = "auto",
        fused_window_process: bool = False,
        downsample_last: bool = False,
        shrink_windows: bool = True,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must have the same length")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.window_size = window_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        grid = (math.ceil(self.img_size[0] / patch_size), math.ceil(self.img_size[1] / patch_size))
        self.patches_resolution = grid
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # Stochastic depth rises linearly from 0 to drop_path_rate over all blocks.
        # device="cpu": plain floats are wanted, and .item() fails under a torch.device("meta")
        # context (building a model on 'meta' to count parameters without memory).
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.stage_dims: List[int] = []
        res = grid
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**i
            if shrink_windows:
                stage_window, stage_shift = stage_window_and_shift(min(res), window_size)
            else:
                stage_window, stage_shift = window_size, True
            self.layers.append(
                BasicLayer(
                    dim=dim,
                    depth=depth,
                    num_heads=heads,
                    window_size=stage_window,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=downsample_last or i < self.num_layers - 1,
                    use_checkpoint=use_checkpoint,
                    shift=shift and stage_shift,
                    use_rpb=use_rpb,
                    attn_impl=attn_impl,
                    fused_window_process=fused_window_process,
                )
            )
            self.stage_dims.append(dim)
            res = (math.ceil(res[0] / 2), math.ceil(res[1] / 2))
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {"relative_position_bias_table"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.use_checkpoint = enable

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) image → (B, H/P, W/P, C) tokens, with the absolute embedding if on."""
        x = self.patch_embed(x)
        if self.ape:
            B, H, W, C = x.shape
            pos = self.absolute_pos_embed
            gh, gw = self.patches_resolution
            if (H, W) != (gh, gw):
                pos = resize_pos_embed(pos, (gh, gw), (H, W))
            x = x + pos.view(1, H, W, C)
        return self.pos_drop(x)

    def stage_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Each stage's output before its patch merging: list of (B, H/(P·2ⁱ), W/(P·2ⁱ), C·2ⁱ)."""
        x = self.embed(x)
        outs = []
        for layer in self.layers:
            x = layer.forward_blocks(x)
            outs.append(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outs


def resize_pos_embed(pos: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of an absolute position embedding.

    Args:
        pos: (1, old_h·old_w, C).
    Returns:
        (1, new_h·new_w, C).
    """
    C = pos.shape[-1]
    grid = pos.reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C)


class SwinTransformer(SwinTrunk):
    """The image classifier of §3.3: trunk, LayerNorm, global average pooling, linear head."""

    def __init__(self, num_classes: int = 1000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) → pooled features (B, num_features)."""
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return x.mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes)."""
        return self.head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def flops(self, img_size: Optional[Tuple[int, int]] = None) -> int:
        """Multiply-accumulates of one forward pass (the paper's "FLOPs"), as the release counts."""
        H, W = img_size or self.img_size
        flops = self.patch_embed.flops(H, W)
        h, w = math.ceil(H / self.patch_embed.patch_size), math.ceil(W / self.patch_embed.patch_size)
        for layer in self.layers:
            flops += layer.flops(h, w)
            if layer.downsample is not None:
                h, w = math.ceil(h / 2), math.ceil(w / 2)
        flops += self.num_features * h * w  # final norm
        flops += self.num_features * self.num_classes
        return flops


class SwinBackbone(SwinTrunk):
    """Multi-scale features for dense prediction, as the released detection backbones.

    ``forward`` returns, for each stage in ``out_indices``, a map (B, C·2ⁱ, H/(P·2ⁱ), W/(P·2ⁱ))
    after a LayerNorm of its own (``norm{i}``). Stages before ``frozen_stages`` (and the patch
    embedding, for ``frozen_stages >= 0``) are frozen and kept in eval mode.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1, **kwargs) -> None:
        # Dense-prediction inputs are far larger than the pre-training size, so, as the released
        # detection backbones do, every stage keeps the full window and shifts, padding as needed.
        kwargs.setdefault("shrink_windows", False)
        super().__init__(**kwargs)
        self.out_indices = tuple(out_indices)
        for i in self.out_indices:
            if not 0 <= i < self.num_layers:
                raise ValueError(f"out_indices {self.out_indices} must lie in [0, {self.num_layers})")
            self.add_module(f"norm{i}", nn.LayerNorm(self.stage_dims[i]))
        self.frozen_stages = frozen_stages
        self.apply(self._init_weights)
        self._freeze_stages()

    def _frozen_modules(self) -> List[nn.Module]:
        mods: List[nn.Module] = []
        if self.frozen_stages >= 0:
            mods.append(self.patch_embed)
        if self.frozen_stages >= 1:
            mods.append(self.pos_drop)
            mods.extend(self.layers[: self.frozen_stages])
        return mods

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 1 and self.ape:
            self.absolute_pos_embed.requires_grad = False
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "SwinBackbone":
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for i, feat in enumerate(self.stage_outputs(x)):
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(feat).permute(0, 3, 1, 2).contiguous())
        return outs
