"""Swin Transformer V1 (Liu et al., ICCV 2021), laid out as the paper's Section 3.

The window plumbing (partition and reverse, the relative position index, the shift mask, the
shifted-window wrapper of a block) lives in ``models.windows``, shared with V2; modules here map
onto the paper: ``PatchEmbed`` (patch partition
and linear embedding, §3.1), ``WindowAttention`` (W-MSA with relative position bias, §3.2,
Eq. 4), ``SwinTransformerBlock`` (Eq. 3, regular or shifted windows), ``PatchMerging`` (§3.1)
and ``SwinTransformer`` (the variants of §3.3). Parameter names and shapes are those of the
official release, so its checkpoints load unchanged.

Feature maps flow between modules as (B, H, W, C), which lets any input size through: blocks
pad to a multiple of the window and crop afterwards, as the released detection backbones do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from timm.layers import DropPath, trunc_normal_

from models.windows import (  # noqa: F401  (re-exported: the plumbing's public names, as before)
    MASK_VALUE,
    UNDERFLOW_MASK_VALUE,
    WindowBlockBase,
    gather_reverse_unshift,
    gather_shift_partition,
    relative_position_index,
    shift_attention_mask,
    stage_window_and_shift,
    window_partition,
    window_permutation,
    window_reverse,
)

logger = logging.getLogger(__name__)

# WindowAttention implementations (MODEL.SWIN.ATTN_IMPL); 'auto' picks per device and mode.
ATTN_IMPLS = ("auto", "sdpa", "reference")


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
    faster one per call (:func:`resolve_attn_impl`).
    """

    # Eval-mode cache of the summed bias + mask (see ``_attn_bias``); a switch for the benchmark.
    cache_eval_bias: bool = True
    # Shifted-window sdpa: fold the windows into the head axis (True) or expand the bias over the
    # batch (False); None decides by device (``folds_windows``). A switch for the benchmark.
    fold_windows: bool | None = None

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
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
        # Eval-mode cache of bias (+ mask) per padded map size; keyed on the mask and the table
        # (a load or a foreach step bumps its version) and cleared by train()/eval() (a fused
        # step does not).
        self._bias_cache = EvalTensorCache()

    def train(self, mode: bool = True) -> WindowAttention:
        self._bias_cache.clear()  # weights may have changed without a version bump (EvalTensorCache)
        return super().train(mode)

    def relative_position_bias(self) -> torch.Tensor:
        """B of Eq. 4: (num_heads, M², M²)."""
        N = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, -1).permute(2, 0, 1).contiguous()

    def _attn_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Bias and mask summed: (nW, heads, N, N), (1, heads, N, N) or None."""
        if not self.use_rpb and mask is None:
            return None

        def build() -> torch.Tensor:
            bias = self.relative_position_bias().unsqueeze(0) if self.use_rpb else None
            if mask is not None:
                bias = mask.unsqueeze(1) if bias is None else bias + mask.unsqueeze(1)
            return bias.to(dtype)

        weights = [self.relative_position_bias_table] if self.use_rpb else []
        return self._bias_cache(self.cache_eval_bias and not self.training, [mask, *weights], build, extra=(dtype,))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B·nW, N, C) tokens of each window, N = M².
            mask: (nW, N, N) of 0 / a large negative value for shifted windows, or None.
        Returns:
            (B·nW, N, C).
        """
        B_, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B_, h, N, d
        nW = 1 if mask is None else mask.shape[0]
        bias = self._attn_bias(mask, q.dtype)  # nW or 1, h, N, N
        impl = resolve_attn_impl(self.attn_impl, x.device, q.dtype)
        if impl == "reference":
            attn = (q * self.scale) @ k.transpose(-2, -1)  # B_, h, N, N
            if bias is not None:
                attn = attn.view(B_ // nW, nW, h, N, N) + bias.unsqueeze(0)
                attn = attn.view(B_, h, N, N)
            attn = attn.softmax(dim=-1)
            attn = F.dropout(attn, self.attn_drop_p, self.training)
            out = attn @ v
        elif nW == 1 or not folds_windows(x.device, self.fold_windows):
            # q, k, v go in as strided views of qkv (no copies). One bias for all windows
            # broadcasts; a per-window bias is expanded over the batch, which on the CPU is
            # cheaper than the q/k/v copies of the folded layout below.
            if bias is not None and nW > 1:
                bias = bias.unsqueeze(0).expand(B_ // nW, nW, h, N, N).reshape(B_, h, N, N)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop_p if self.training else 0.0, scale=self.scale
            )
        else:
            out = sdpa_windows_folded(q, k, v, bias, nW, self.attn_drop_p if self.training else 0.0, self.scale)
        x = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))

    def flops(self, N: int) -> int:
        """Multiply-accumulates for one window of N tokens (as the official release counts)."""
        d = self.dim // self.num_heads
        return N * self.dim * 3 * self.dim + 2 * self.num_heads * N * N * d + N * self.dim * self.dim


def resolve_attn_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The attention path ``impl`` stands for in this call; 'auto' picks by where it runs and
    the ``dtype`` of the attention's inputs.

    Eager: sdpa on CUDA and for fp32 CPU inference (its fused CPU kernel, fed strided q/k/v
    without copies, beats matmul + softmax for 49-token windows); the reference math for bf16 and
    fp16 CPU inference (there the fused kernel loses: Swin-T 224 batch 16, bf16 weights, 2-core
    AVX-512-BF16 EPYC, 24.35 -> 26.03 images/s with the math; V2 passes no dtype, see there) and
    for CPU training (with a bias that needs a gradient, CPU sdpa falls back to a slower math
    path). Under
    ``torch.compile``: the reference math, which Inductor fuses (bias, mask and softmax into one
    kernel beside the matrix products) while sdpa stays an opaque call fed a dense mask: on a
    2-core AVX-512-BF16 CPU, Swin-T's frozen bf16 graph spent 108 ms per batch of 16 in sdpa
    against timm's 65 ms in the fused math.
    """
    if impl != "auto":
        return impl
    if _is_compiling():
        return "reference"
    if device.type == "cpu" and (torch.is_grad_enabled() or dtype in (torch.bfloat16, torch.float16)):
        return "reference"
    return "sdpa"


def folds_windows(device: torch.device, choice: bool | None = None) -> bool:
    """Whether shifted-window sdpa folds the windows into the head axis (CUDA: the mask then
    broadcasts over the batch) rather than expanding the bias B times (CPU: cheaper there than
    the q/k/v copies of the folded layout). ``choice``, when not None, decides instead."""
    return device.type != "cpu" if choice is None else choice


def sdpa_windows_folded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    n_windows: int,
    dropout_p: float,
    scale: float,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` with the windows of each image folded into the head axis,
    so one (nW, heads, N, N) bias + mask broadcasts over the batch instead of being expanded B
    times (the CUDA path for shifted windows).

    Args:
        q, k, v: (B·nW, heads, N, d). bias: (nW, heads, N, N), (1, heads, N, N) or None.
    Returns:
        (B·nW, heads, N, d).
    """
    B_, h, N, _ = q.shape
    shape = (B_ // n_windows, n_windows * h, N, -1)
    bias4 = None if bias is None else bias.expand(n_windows, h, N, N).reshape(1, n_windows * h, N, N)
    out = F.scaled_dot_product_attention(
        q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=bias4, dropout_p=dropout_p, scale=scale
    )
    # reshape, not view: CUDA's memory-efficient kernel (taken whenever the mask needs a gradient,
    # and for fp32) returns a layout that view() refuses.
    return out.reshape(B_, h, N, -1)


def residual_add(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch, with the residual stream kept in x's dtype.

    When the branch is a fresh tensor of x's dtype the sum goes in place into it (its backward
    needs no saved copy: one large allocation fewer per branch). Under autocast the branch comes
    out in fp16/bf16 while x is fp32; the sum then promotes to fp32, as in the release and timm.
    """
    if branch.dtype == x.dtype and branch.shape == x.shape:
        return branch.add_(x)
    return x + branch


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def eval_cache_usable(enabled: bool) -> bool:
    """Whether a module may reuse a tensor derived from its weights (attention bias + mask) from
    an earlier call: only in inference, never while tracing or compiling. Callers fold their own
    ``not self.training`` into ``enabled``."""
    return enabled and not torch.is_grad_enabled() and not torch.jit.is_tracing() and not _is_compiling()


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What identifies ``t``'s current values while its storage is kept alive: a load or a
    foreach/single-tensor optimizer step bumps the version; ``.to(dtype/device)`` or an assigning
    load puts the values in another storage."""
    if t is None:
        return None
    # Inference tensors (a mask built under inference_mode) keep no version counter.
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), version, tuple(t.shape), t.dtype, t.device)


class EvalTensorCache:
    """A few tensors derived from weights (attention bias plus mask), kept between inference
    calls; in training, tracing or compiling every call builds afresh.

    An entry is keyed on the addresses and versions of the tensors it was built from, and holds
    those storages: freed, an address could go to another mask or weight of the same shape (a
    backbone run at many image sizes empties ``windows``' mask cache) and hit the old entry. The
    owning module calls ``clear`` from its ``train()``: a fused optimizer's steps leave the
    weights' versions as they were, so without it a trainer's every validation after the first
    would reuse the first one's bias.
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._store: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def clear(self) -> None:
        self._store.clear()

    def __call__(
        self,
        enabled: bool,
        sources: Sequence[torch.Tensor | None],
        build: Callable[[], torch.Tensor],
        extra: tuple = (),
    ) -> torch.Tensor:
        """``build()``, or what it returned for the same ``sources`` (and ``extra``, e.g. a dtype)."""
        if not eval_cache_usable(enabled):
            return build()
        key = (extra, tuple(_tensor_key(t) for t in sources))
        hit = self._store.get(key)
        if hit is None:
            if len(self._store) >= self.limit:
                self._store.clear()
            anchors = tuple(t.detach() for t in sources if t is not None)
            hit = self._store[key] = (anchors, build())
        return hit[1]


class SwinTransformerBlock(WindowBlockBase):
    """One Swin block (Eq. 3): ẑ = (S)W-MSA(LN(z)) + z;  z' = MLP(LN(ẑ)) + ẑ.

    With ``shift_size`` > 0 the map is cyclically shifted by (-s, -s) before window attention
    and the shift mask keeps attention inside each sub-window (SW-MSA); otherwise W-MSA. The
    padding, shifting and partitioning around ``attn`` is :class:`models.windows.WindowBlockBase`.
    """

    # Masked pairs get a weight of exactly 0, not the release's subnormal e^-100 (same outputs,
    # faster on the CPU; see models.windows.UNDERFLOW_MASK_VALUE).
    mask_value = UNDERFLOW_MASK_VALUE

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        use_rpb: bool = True,
        attn_impl: str = "auto",
        fused_window_process: bool = False,
        resolution: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self._init_windows(window_size, shift_size, fused_window_process, resolution)
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop, use_rpb, attn_impl
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        x = residual_add(x, self.drop_path(self._attention(self.norm1(x))))
        return residual_add(x, self.drop_path(self.mlp(self.norm2(x))))


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

    @staticmethod
    def concat_neighbourhoods(x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 4C), odd sides zero-padded, in the release's order."""
        _, H, W, _ = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(self.concat_neighbourhoods(x)))

    def flops(self, height: int, width: int) -> int:
        return height * width * self.dim + math.ceil(height / 2) * math.ceil(width / 2) * 4 * self.dim * 2 * self.dim


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating W-MSA and SW-MSA, then (optionally) patch merging.

    ``block_cls`` and ``merge_cls`` are the family's block and patch merging (V1's here, V2's in
    ``swin_transformer_v2``); ``resolution`` is the stage's (H, W) map in the model as built (the
    blocks keep its shift mask); ``block_options`` go to every block unchanged.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: Sequence[float] = (),
        downsample: bool = False,
        use_checkpoint: bool = False,
        shift: bool = True,
        block_cls: type = SwinTransformerBlock,
        merge_cls: type = PatchMerging,
        resolution: tuple[int, int] | None = None,
        **block_options,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            [
                block_cls(
                    dim=dim,
                    num_heads=num_heads,
                    window_size=window_size,
                    shift_size=window_size // 2 if (shift and i % 2 == 1) else 0,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    resolution=resolution,
                    **block_options,
                )
                for i in range(depth)
            ]
        )
        self.downsample = merge_cls(dim) if downsample else None

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


class SwinTrunk(nn.Module):
    """Patch embedding, optional absolute position embedding and the four stages.

    Shared by the classifier (:class:`SwinTransformer`) and the dense-prediction backbone, and by
    V2 (``swin_transformer_v2``), which swaps in its own ``block_cls`` and ``merge_cls``. Options
    beyond the common ones (V1: ``qk_scale``, ``use_rpb``, ``attn_impl``) go to every block.
    """

    block_cls: type = SwinTransformerBlock
    merge_cls: type = PatchMerging

    def _stage_options(self, stage: int, options: dict) -> dict:
        """The block options of one stage (V2 picks its stage's pretrained window here)."""
        return options

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        shift: bool = True,
        fused_window_process: bool = False,
        downsample_last: bool = False,
        shrink_windows: bool = True,
        **block_options,
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
        self.stage_dims: list[int] = []
        res = grid
        clamped = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim = embed_dim * 2**i
            if shrink_windows:
                stage_window, stage_shift = stage_window_and_shift(min(res), window_size)
                if stage_window < window_size:
                    clamped.append(f"stage {i + 1} ({res[0]}x{res[1]}) uses window {stage_window}, unshifted")
            else:
                stage_window, stage_shift = window_size, True
            self.layers.append(
                BasicLayer(
                    dim=dim,
                    depth=depth,
                    num_heads=heads,
                    window_size=stage_window,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=downsample_last or i < self.num_layers - 1,
                    use_checkpoint=use_checkpoint,
                    shift=shift and stage_shift,
                    block_cls=self.block_cls,
                    merge_cls=self.merge_cls,
                    resolution=res,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    fused_window_process=fused_window_process,
                    **self._stage_options(i, block_options),
                )
            )
            self.stage_dims.append(dim)
            res = (math.ceil(res[0] / 2), math.ceil(res[1] / 2))
        if clamped:
            # The release's rule, said once per model: a window larger than its feature map.
            logger.info("window %d is larger than the feature map: %s (as released)", window_size, "; ".join(clamped))
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
        return self.add_position(self.patch_embed(x))

    def add_position(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, H/P, W/P, C) plus the absolute position embedding (if on), then dropout.

        Separate from :meth:`embed` so that SimMIM can swap masked tokens in before it.
        """
        if self.ape:
            B, H, W, C = x.shape
            pos = self.absolute_pos_embed
            gh, gw = self.patches_resolution
            if (H, W) != (gh, gw):
                pos = resize_pos_embed(pos, (gh, gw), (H, W))
            x = x + pos.view(1, H, W, C)
        return self.pos_drop(x)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output before its patch merging: list of (B, H/(P·2ⁱ), W/(P·2ⁱ), C·2ⁱ)."""
        x = self.embed(x)
        outs = []
        for layer in self.layers:
            x = layer.forward_blocks(x)
            outs.append(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outs


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
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

    def flops(self, img_size: tuple[int, int] | None = None) -> int:
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

    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
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

    def train(self, mode: bool = True) -> SwinBackbone:
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, feat in enumerate(self.stage_outputs(x)):
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(feat).permute(0, 3, 1, 2).contiguous())
        return outs
