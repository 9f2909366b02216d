"""Swin Transformer V2 (Liu et al., "Scaling Up Capacity and Resolution", CVPR 2022), laid out as
the paper's Section 3.

V2 keeps V1's hierarchy, windows and shifted windows (``models.windows``, shared with V1) and
changes three things inside a block, plus the patch merging:

- res-post-norm (§3.2, Fig. 1): the LayerNorm moves from the input of each residual branch to
  its output, ``x = x + LN(Attn(x))``, which keeps activations of deep models from growing stage
  by stage; the release starts these norms at zero, so a new block is the identity;
- scaled cosine attention (§3.2, Eq. 2): Sim(q, k) = cos(q, k) / τ + B, with a learned
  temperature per head (``logit_scale`` = log 1/τ, clamped at log 100 so τ ≥ 0.01);
- log-spaced continuous position bias (§3.3, Eq. 3–4): B comes from a small MLP (2 → 512 → heads)
  evaluated at the log-spaced relative coordinates of the window, so a model trained at one window
  size transfers to another with no table to interpolate (``pretrained_window_size``);
- patch merging reduces first, then normalises (LayerNorm over 2C instead of 4C).

``WindowAttentionV2``, ``SwinTransformerBlockV2``, ``PatchMergingV2`` and
``SwinTransformerV2`` / ``SwinBackboneV2`` carry the release's parameter names and shapes, so
its checkpoints load unchanged. Feature maps flow as (B, H, W, C), so any input size works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from models.swin_transformer import (
    ATTN_IMPLS,
    EvalTensorCache,
    Mlp,
    PatchMerging,
    SwinBackbone,
    SwinTransformer,
    folds_windows,
    resolve_attn_impl,
    sdpa_windows_folded,
)
from models.windows import MASK_VALUE, WindowBlockBase, relative_position_index

# τ ≥ 0.01: the learned log-temperature is clamped at log(1/0.01) before exponentiation.
LOGIT_SCALE_MAX = math.log(100.0)
# Initial temperature τ = 0.1, i.e. logit_scale = log 10, as released.
LOGIT_SCALE_INIT = math.log(10.0)
# Hidden width of the continuous position-bias MLP.
CPB_HIDDEN = 512
# The bias is 16·sigmoid(MLP(Δ)): bounded in (0, 16).
CPB_BIAS_SCALE = 16.0


# ---------------------------------------------------------------------------------------------
# Tensor plumbing
# ---------------------------------------------------------------------------------------------
def log_spaced_relative_coords(window_size: int, pretrained_window_size: int = 0) -> torch.Tensor:
    """The inputs of the position-bias MLP (Eq. 4): every relative offset of an M×M window.

    Offsets Δ ∈ [-(M-1), M-1]² are divided by (M_pre - 1), the window of pre-training (M - 1 when
    none is given), scaled to [-8, 8] and mapped to sign(Δ)·log2(1 + |Δ|) / log2(8). A model
    fine-tuned at a larger window then sees the same inputs for the offsets it was trained on and
    extrapolates, slowly in log space, for the new ones.

    Returns:
        ((2M-1)², 2) float32, rows in the order of :func:`relative_position_index` (dy, dx).
    """
    M = window_size
    span = (pretrained_window_size if pretrained_window_size > 0 else M) - 1
    delta = torch.arange(-(M - 1), M, dtype=torch.float32) / max(span, 1) * 8.0
    coords = torch.stack(torch.meshgrid(delta, delta, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8.0)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class WindowAttentionV2(nn.Module):
    """Scaled cosine attention inside M×M windows with a continuous position bias (§3.2–3.3).

    Attention = SoftMax(cos(q, k) · exp(min(s, log 100)) + 16·σ(MLP(Δ̂)) + mask) V, with s the
    per-head ``logit_scale`` and Δ̂ from :func:`log_spaced_relative_coords`. The logits, their
    scale and the softmax are computed in fp32 even under autocast (:func:`_logit_precision`): a
    cosine times a scale of up to 100 plus the bias loses too much in fp16 (the release's fp16 runs
    diverge downstream) and, in training, in bf16; bf16 inference keeps them in bf16, as timm does.

    ``'reference'`` spells the formula out; ``'sdpa'`` folds the per-head scale into the
    normalised queries and calls ``scaled_dot_product_attention`` (in fp32); ``'auto'`` picks as V1
    does (:func:`resolve_attn_impl`).
    """

    # Eval-mode cache of the summed bias + mask; a switch for the benchmark.
    cache_eval_bias: bool = True
    # Shifted-window sdpa: fold the windows into the head axis or expand the bias (as V1's).
    fold_windows: bool | None = None

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int = 0,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {attn_impl!r}")
        self.dim = dim
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.attn_drop_p = attn_drop

        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), LOGIT_SCALE_INIT))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN, bias=True), nn.ReLU(inplace=True), nn.Linear(CPB_HIDDEN, num_heads, bias=False)
        )
        # Both derived from the window sizes: rebuilt, never stored in or loaded from checkpoints.
        self.register_buffer(
            "relative_coords_table", log_spaced_relative_coords(window_size, pretrained_window_size), persistent=False
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        # q and v have biases, k none: a key bias adds the same logit to every key of a query.
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache = EvalTensorCache()

    def train(self, mode: bool = True) -> WindowAttentionV2:
        self._bias_cache.clear()  # weights may have changed without a version bump (EvalTensorCache)
        return super().train(mode)

    def bias_table(self) -> torch.Tensor:
        """16·σ(MLP(Δ̂)) for every relative offset: ((2M-1)², num_heads), fp32."""
        with _autocast_off(self.relative_coords_table.device):
            return CPB_BIAS_SCALE * torch.sigmoid(_full_precision(self.cpb_mlp(self.relative_coords_table)))

    def relative_position_bias(self) -> torch.Tensor:
        """B of Eq. 2: (num_heads, M², M²), fp32."""
        N = self.window_size**2
        bias = self.bias_table()[self.relative_position_index.view(-1)]
        return bias.view(N, N, -1).permute(2, 0, 1).contiguous()

    def logit_scales(self) -> torch.Tensor:
        """1/τ per head: exp(min(logit_scale, log 100)), (num_heads, 1, 1) fp32."""
        return torch.clamp(_full_precision(self.logit_scale), max=LOGIT_SCALE_MAX).exp()

    def _attn_bias(self, mask: torch.Tensor | None) -> torch.Tensor:
        """Bias plus mask, fp32: (nW, heads, N, N) with a mask, else (1, heads, N, N)."""

        def build() -> torch.Tensor:
            bias = self.relative_position_bias().unsqueeze(0)
            return bias if mask is None else bias + mask.unsqueeze(1).to(bias.dtype)

        weights = list(self.cpb_mlp.parameters())
        return self._bias_cache(self.cache_eval_bias and not self.training, [mask, *weights], build)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B_, N, C) → (3, B_, heads, N, d): one matmul, bias (q_bias, 0, v_bias)."""
        B_, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        return qkv.reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B·nW, N, C) tokens of each window, N = M².
            mask: (nW, N, N) of 0 / the release's -100 for shifted windows, or None.
        Returns:
            (B·nW, N, C).
        """
        B_, N, C = x.shape
        h = self.num_heads
        qkv = self._qkv(x)  # 3, B_, h, N, d
        v = qkv[2]
        nW = 1 if mask is None else mask.shape[0]
        bias = self._attn_bias(mask)  # nW or 1, h, N, N (fp32)
        # V1's choice as in fp32, whatever the dtype: in bf16 the fused kernel keeps the softmax in
        # fp32, while the math would round V2's logits (scaled by up to 100) to bf16, in steps of 0.5.
        impl = resolve_attn_impl(self.attn_impl, x.device)
        p_drop = self.attn_drop_p if self.training else 0.0
        with _autocast_off(x.device):
            q, k = _logit_precision(qkv[:2]).unbind(0)  # one cast for both
            # Folding 1/τ into the unit queries gives the same logits as scaling cos(q, k).
            qn = unit_rows(q, self.logit_scales().to(q.dtype))
            kn = unit_rows(k)
            if impl == "reference":
                attn = (qn @ kn.transpose(-2, -1)).view(B_ // nW, nW, h, N, N) + bias.unsqueeze(0).to(qn.dtype)
                attn = attn.view(B_, h, N, N).softmax(dim=-1)
                attn = F.dropout(attn, p_drop, self.training)
            elif nW > 1 and folds_windows(x.device, self.fold_windows):
                out = sdpa_windows_folded(qn, kn, v.to(qn.dtype), bias.to(qn.dtype), nW, p_drop, 1.0)
            else:
                if nW > 1:
                    bias = bias.unsqueeze(0).expand(B_ // nW, nW, h, N, N).reshape(B_, h, N, N)
                out = F.scaled_dot_product_attention(
                    qn, kn, v.to(qn.dtype), attn_mask=bias.to(qn.dtype), dropout_p=p_drop, scale=1.0
                )
        if impl == "reference":
            out = attn.to(v.dtype) @ v
        else:
            out = out.to(v.dtype)
        x = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))

    def flops(self, N: int) -> int:
        """Multiply-accumulates for one window of N tokens, as the release counts (no bias MLP)."""
        d = self.dim // self.num_heads
        return N * self.dim * 3 * self.dim + 2 * self.num_heads * N * N * d + N * self.dim * self.dim

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, window_size={self.window_size}, pretrained_window_size={self.pretrained_window_size}, "
            f"num_heads={self.num_heads}"
        )


def unit_rows(t: torch.Tensor, scale: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(t, dim=-1) * scale`` in one pass over ``t``: the scale is folded into the
    per-row reciprocal norm (a tensor of shape (..., 1)) before the single multiply.

    Args:
        t: (..., d). scale: broadcastable to (..., 1), or None.
    Returns:
        (..., d), rows of length ``scale`` (1 without one).
    """
    inv = t.norm(dim=-1, keepdim=True).clamp_min(eps).reciprocal()
    return t * (inv if scale is None else inv * scale)


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 if it is a half type (fp16/bf16); fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _logit_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision the cosine-attention logits are computed in.

    fp32 for fp16 (logits up to 100 overflow its range after the scale: the release's fp16 runs
    diverge) and for bf16 whenever gradients flow (training keeps the logits in fp32); bf16
    inference stays in bf16, as timm's V2 computes it: 1.2x the V2 forward on a bf16 CPU, with
    logits within bf16 error. fp32 and fp64 stay as they are.
    """
    if t.dtype == torch.float16 or (t.dtype == torch.bfloat16 and torch.is_grad_enabled()):
        return t.float()
    return t


def _autocast_off(device: torch.device):
    """A context where autocast is off for ``device``'s type (fp32 stays fp32)."""
    return torch.autocast(
        device_type=device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu", enabled=False
    )


class SwinTransformerBlockV2(WindowBlockBase):
    """One V2 block with res-post-norm (§3.2, Fig. 1): x = x + LN(Attn(x)); x = x + LN(MLP(x)).

    With ``shift_size`` > 0 the windows are shifted (SW-MSA) exactly as in V1; the padding,
    shifting and partitioning around ``attn`` is :class:`models.windows.WindowBlockBase`.
    """

    # The release's -100, not V1's underflowing value: V2's logits reach ±116, where -100 lets a
    # masked pair through, and the released weights were trained with that.
    mask_value = MASK_VALUE

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 8,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        pretrained_window_size: int = 0,
        attn_impl: str = "auto",
        fused_window_process: bool = False,
        resolution: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self._init_windows(window_size, shift_size, fused_window_process, resolution)
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.attn = WindowAttentionV2(
            dim, window_size, num_heads, qkv_bias, attn_drop, drop, pretrained_window_size, attn_impl
        )
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        x = x + self.drop_path(self.norm1(self._attention(x)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMergingV2(PatchMerging):
    """V2 patch merging: 2×2 neighbourhoods concatenated (4C), Linear 4C→2C, then LayerNorm(2C).

    (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C); same concatenation order and padding as V1.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(self.concat_neighbourhoods(x)))

    def flops(self, height: int, width: int) -> int:
        out = math.ceil(height / 2) * math.ceil(width / 2)
        return out * 4 * self.dim * 2 * self.dim + out * 2 * self.dim


class _V2Family:
    """What makes a Swin trunk a V2 one: its block, its merging, per-stage pretrained windows,
    the no-weight-decay keywords and the zero-initialised post-norms of the release."""

    block_cls = SwinTransformerBlockV2
    merge_cls = PatchMergingV2

    def _stage_options(self, stage: int, options: dict) -> dict:
        options = dict(options)
        options["pretrained_window_size"] = options.pop("pretrained_window_sizes")[stage]
        return options

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

    def _init_respostnorm(self) -> None:
        # The release zero-initialises both post-norms (weight and bias) of every block, so each
        # residual branch starts switched off.
        for m in self.modules():
            if isinstance(m, SwinTransformerBlockV2):
                for norm in (m.norm1, m.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)


def _check_pretrained_windows(pretrained_window_sizes: Sequence[int], depths: Sequence[int]) -> list:
    sizes = [int(s) for s in pretrained_window_sizes]
    if len(sizes) != len(depths):
        raise ValueError(f"pretrained_window_sizes {sizes} must give one window per stage ({len(depths)} stages)")
    return sizes


class SwinTransformerV2(_V2Family, SwinTransformer):
    """The V2 image classifier: trunk of V2 blocks, LayerNorm, global average pooling, linear head.

    ``pretrained_window_sizes``: per stage, the window the weights were trained with (0: this
    model's own), which sets the scale of the position-bias MLP's inputs.
    """

    def __init__(
        self, num_classes: int = 1000, pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0), **kwargs
    ) -> None:
        sizes = _check_pretrained_windows(pretrained_window_sizes, kwargs.get("depths", (2, 2, 6, 2)))
        super().__init__(num_classes=num_classes, pretrained_window_sizes=sizes, **kwargs)
        self.pretrained_window_sizes = sizes
        self._init_respostnorm()


class SwinBackboneV2(_V2Family, SwinBackbone):
    """Multi-scale V2 features for dense prediction (see :class:`SwinBackbone`)."""

    def __init__(self, pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0), **kwargs) -> None:
        sizes = _check_pretrained_windows(pretrained_window_sizes, kwargs.get("depths", (2, 2, 6, 2)))
        super().__init__(pretrained_window_sizes=sizes, **kwargs)
        self.pretrained_window_sizes = sizes
        self._init_respostnorm()
