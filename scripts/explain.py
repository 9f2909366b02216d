"""Walk one image through a Swin Transformer (V1 or V2) and draw the paper's figures from the real model.

    python scripts/explain.py --cfg configs/swin_tiny.yaml [--img-size 224] [--out output/explain]
    python scripts/explain.py --cfg configs/demo/swin_demo_digits.yaml --resume CKPT --image IMG \
        [--block 1.2] [--head 0] [--queries 8,8 15,15]

The walk lists every stage and block with its window size, shift and number of windows, and the
tensor shapes at patch embedding, window partition, qkv, attention map, window reverse and patch
merging, then parameters and multiply-accumulates (MACs) per stage. Every number is read off
the real model while it runs (forward hooks on ``PatchEmbed``, ``BasicLayer``, the blocks
(``models.windows.WindowBlockBase``: V1's ``SwinTransformerBlock``, V2's
``SwinTransformerBlockV2``) and their ``norm1`` / ``norm2`` and ``drop_path``, the attention
module and, for V1, its ``qkv`` Linear, ``PatchMerging`` and the head).

V1 (pre-norm): ``norm1`` → partition → qkv → attention → reverse → residual add. The attention
maps are recomputed inside the ``WindowAttention`` hook as softmax(q kᵀ · scale + B + mask) from
the q, k the ``qkv`` hook captured, the module's own ``relative_position_bias()`` and the mask
the block passed in.

V2 (res-post-norm, scaled cosine attention): partition of the *un-normalised* block input →
qkv → attention → reverse → post-norm ``norm1`` → residual add, then MLP → post-norm ``norm2``
→ residual add. ``WindowAttentionV2`` projects with ``F.linear`` (bias q_bias, 0, v_bias), so no
hook on ``attn.qkv`` fires: q, k, v come from the module's own ``attn._qkv(windows)``, and the
maps are softmax(cos(q, k) · 1/τ + B + mask) with the per-head 1/τ = ``logit_scales()`` and
B = ``relative_position_bias()`` = 16·σ(MLP) of the log-spaced offsets.

For both, pushing the maps through ``v`` and ``proj`` reproduces the module's output, which the
walk checks and reports.

Pictures written to --out (PNG): ``windows.png`` (regular and shifted window partition, paper
Fig. 2), ``cyclic_shift_mask.png`` (cyclic shift and the model's own attention mask, Fig. 4),
``relative_position.png`` (relative position index and one head's bias B: V1's learned table,
V2's table 16·σ(MLP(Δ̂)) computed by the position-bias MLP), and with --resume and --image
``attention.png`` (attention of a few query tokens of one block and head over their window, on
top of the image). Stages and blocks are numbered from 1 (``--block 1.2`` is stage 1, block 2,
as the walk prints them); heads from 0.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

import models.windows as windows_module  # noqa: E402
from config import model_section  # noqa: E402
from errors import UserError, report_user_errors  # noqa: E402
from models.swin_transformer import (  # noqa: E402
    BasicLayer,
    PatchEmbed,
    PatchMerging,
    SwinTransformer,
    WindowAttention,
    window_reverse,
)
from models.swin_transformer_v2 import (  # noqa: E402
    CPB_BIAS_SCALE,
    PatchMergingV2,
    SwinTransformerBlockV2,
    WindowAttentionV2,
)
from models.windows import WindowBlockBase  # noqa: E402
from models.windows import roll_reverse_unshift as reverse_unshift  # noqa: E402
from models.windows import roll_shift_partition as shift_partition  # noqa: E402

BlockId = tuple[int, int]  # (stage, block), both counted from 1
# The attention modules of the two families (V2's does not subclass V1's).
AnyWindowAttention = WindowAttention | WindowAttentionV2
# V2's patch merging subclasses V1's; named for the reader.
AnyPatchMerging = PatchMerging | PatchMergingV2


def is_v2_block(blk: nn.Module) -> bool:
    """Whether ``blk`` is a Swin V2 block (res-post-norm, scaled cosine attention)."""
    return isinstance(blk, SwinTransformerBlockV2)


# ---------------------------------------------------------------------------------------------
# The walk: hooks on the real model
# ---------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One step of the walk.

    ``step`` is one of 'input', 'patch_embed', 'stage', 'block', 'window_partition', 'qkv',
    'attention', 'window_reverse', 'post_norm' (V2 blocks only), 'patch_merging', 'stage_cost',
    'head', 'total'. ``stage`` and
    ``block`` count from 1. Shapes are those of the real tensors (batch included); ``info`` holds
    what else the step knows (window size, shift, number of windows, parameters, MACs, ...).
    """

    step: str
    stage: int | None = None
    block: int | None = None
    shape_in: tuple[int, ...] = ()
    shape_out: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class WalkResult:
    """Everything one traced forward pass produced."""

    records: list[Record]
    logits: torch.Tensor
    maps: dict[BlockId, dict[str, Any]]  # attention maps of the blocks asked for in keep_maps

    def find(self, step: str, stage: int | None = None, block: int | None = None) -> Record:
        return find_record(self.records, step, stage, block)


def find_record(records: Sequence[Record], step: str, stage: int | None = None, block: int | None = None) -> Record:
    """The first record of ``step`` (at ``stage``/``block`` when given)."""
    for r in records:
        if r.step == step and (stage is None or r.stage == stage) and (block is None or r.block == block):
            return r
    raise KeyError(f"no {step!r} record for stage {stage} block {block}")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _padded_hw(height: int, width: int, window_size: int) -> tuple[int, int]:
    """The (height, width) the block pads its map to, from the model's own padding function."""
    pad = getattr(windows_module, "pad_to_multiple", None)
    if pad is None:  # the model no longer exposes it: the release's rule
        return -(-height // window_size) * window_size, -(-width // window_size) * window_size
    padded = pad(torch.empty(1, height, width, 0), window_size)
    return int(padded.shape[1]), int(padded.shape[2])


class _Tracer:
    """Installs forward hooks on a model, collects records while it runs, removes them on exit.

    Per block: the pre-hook sees the block's input map; the attention module's pre-hook the
    partitioned windows (B·nW, N, C) and the mask the block passes; its post-hook its output.

    V1 (pre-norm): the ``norm1`` hook sees the map that is partitioned; the ``qkv`` hook the
    projection (B·nW, N, 3C); the first ``drop_path`` call after the attention the windows
    reversed into the map (the block output stands in if a block stops calling ``drop_path``).

    V2 (res-post-norm): the block input itself is partitioned; q, k, v are recomputed with the
    module's own ``attn._qkv`` (its projection is a ``F.linear`` call no hook sees); ``norm1``
    runs *after* the attention, so its input is the reversed map and its output the post-norm;
    ``norm2`` likewise normalises the MLP's output.
    """

    def __init__(self, model: SwinTransformer, keep_maps: Sequence[BlockId] = ()) -> None:
        self.model = model
        self.keep = set(keep_maps)
        self.records: list[Record] = []
        self.maps: dict[BlockId, dict[str, Any]] = {}
        self._ids: dict[int, BlockId] = {}
        self._stage_of: dict[int, int] = {}
        self._post_norm_branch: dict[int, str] = {}  # id(norm) → 'attention' / 'mlp' (V2 blocks only)
        self._current: BlockId | None = None
        self._block_record: Record | None = None
        self._normed: tuple[int, ...] | None = None
        self._await_reverse: tuple[int, ...] | None = None
        self._attn_in: dict[str, Any] = {}
        self._stage_in: dict[int, tuple[int, ...]] = {}
        self._handles: list[Any] = []
        for si, layer in enumerate(model.layers, 1):
            self._stage_of[id(layer)] = si
            if layer.downsample is not None:
                self._stage_of[id(layer.downsample)] = si
            for bi, blk in enumerate(layer.blocks, 1):
                for m in (blk, blk.attn, blk.attn.qkv, blk.norm1, blk.norm2):
                    self._ids[id(m)] = (si, bi)
                if is_v2_block(blk):
                    self._post_norm_branch[id(blk.norm1)] = "attention"
                    self._post_norm_branch[id(blk.norm2)] = "mlp"

    # -- hooks ----------------------------------------------------------------------------------
    def _on_patch_embed(self, module: PatchEmbed, args: tuple, out: torch.Tensor) -> None:
        self.records.append(
            Record(
                "patch_embed",
                shape_in=_shape(args[0]),
                shape_out=_shape(out),
                info={"patch_size": module.patch_size, "embed_dim": module.embed_dim},
            )
        )

    def _on_stage_start(self, layer: BasicLayer, args: tuple) -> None:
        si = self._stage_of[id(layer)]
        x = args[0]
        self._stage_in[si] = _shape(x)
        first = layer.blocks[0]
        self.records.append(
            Record(
                "stage",
                stage=si,
                shape_in=_shape(x),
                info={
                    "depth": len(layer.blocks),
                    "heads": first.num_heads,
                    "head_dim": first.dim // first.num_heads,
                    "dim": first.dim,
                    "window_size": first.window_size,
                    "shifts": [b.shift_size for b in layer.blocks],
                },
            )
        )

    def _on_stage_end(self, layer: BasicLayer, args: tuple, out: torch.Tensor) -> None:
        si = self._stage_of[id(layer)]
        _, h, w, _ = self._stage_in[si]
        params = sum(p.numel() for p in layer.parameters())
        macs = int(layer.flops(h, w))
        self.records.append(
            Record(
                "stage_cost",
                stage=si,
                shape_in=self._stage_in[si],
                shape_out=_shape(out),
                info={"params": params, "macs": macs},
            )
        )

    def _on_block_start(self, blk: WindowBlockBase, args: tuple) -> None:
        self._current = self._ids[id(blk)]
        si, bi = self._current
        v2 = is_v2_block(blk)
        rec = Record(
            "block",
            stage=si,
            block=bi,
            shape_in=_shape(args[0]),
            info={
                "window_size": blk.window_size,
                "shift_size": blk.shift_size,
                "kind": "SW-MSA" if blk.shift_size else "W-MSA",
                "heads": blk.num_heads,
                "head_dim": blk.dim // blk.num_heads,
                "family": "v2" if v2 else "v1",
                "norm": "post" if v2 else "pre",  # where the LayerNorms sit on the residual branches
            },
        )
        self._block_record = rec
        self._normed = None
        self._await_reverse = None
        self.records.append(rec)

    def _on_norm1(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        """V1: the pre-norm's output is the map the block partitions."""
        if self._current is not None and self._normed is None:
            self._normed = _shape(out)

    def _on_post_norm(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        """V2: ``norm1`` normalises the reversed attention output, ``norm2`` the MLP's output;
        each then goes through ``drop_path`` and is added to the residual stream."""
        if self._current is None:
            return
        si, bi = self._current
        branch = self._post_norm_branch[id(module)]
        if branch == "attention" and self._await_reverse is not None:
            # The reversed (and cropped) map is exactly what the post-norm is fed.
            self._record_reverse(_shape(args[0]), "post-norm input")
        norm = "norm1" if branch == "attention" else "norm2"
        self.records.append(
            Record(
                "post_norm",
                stage=si,
                block=bi,
                shape_in=_shape(args[0]),
                shape_out=_shape(out),
                info={"branch": branch, "norm": norm},
            )
        )

    def _record_reverse(self, shape_out: tuple[int, ...], source: str) -> None:
        si, bi = self._current
        shift = self._block_record.info["shift_size"] if self._block_record is not None else 0
        self.records.append(
            Record(
                "window_reverse",
                stage=si,
                block=bi,
                shape_in=self._await_reverse,
                shape_out=shape_out,
                info={"shift_size": shift, "source": source},
            )
        )
        self._await_reverse = None

    def _on_drop_path(self, module: nn.Module, args: tuple) -> None:
        if self._current is not None and self._await_reverse is not None:
            self._record_reverse(_shape(args[0]), "drop_path input")

    def _on_block_end(self, blk: WindowBlockBase, args: tuple, out: torch.Tensor) -> None:
        if self._await_reverse is not None:
            self._record_reverse(_shape(out), "block output")
        if self._block_record is not None:
            self._block_record.shape_out = _shape(out)
        self._current = None
        self._block_record = None

    def _on_attn_start(self, attn: AnyWindowAttention, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        x = args[0]
        self._attn_in = {"x": x, "mask": mask}
        si, bi = self._ids[id(attn)]
        rec = self._block_record
        map_shape = self._normed or (rec.shape_in if rec is not None else ())
        batch = map_shape[0] if map_shape else 1
        M = attn.window_size
        n_windows = x.shape[0] // batch
        v2 = isinstance(attn, WindowAttentionV2)
        info: dict[str, Any] = {
            "shift_size": rec.info["shift_size"] if rec is not None else 0,
            "window_size": M,
            "num_windows": n_windows,
            "batch": batch,
            # V2 attends on the raw residual stream; V1 on norm1's output.
            "source": "block input (un-normalised)" if v2 else "norm1 output",
        }
        if len(map_shape) == 4:
            info["padded_hw"] = _padded_hw(map_shape[1], map_shape[2], M)
        self.records.append(
            Record("window_partition", stage=si, block=bi, shape_in=tuple(map_shape), shape_out=_shape(x), info=info)
        )
        if rec is not None:
            rec.info["num_windows"] = n_windows
            if "padded_hw" in info:
                rec.info["padded_hw"] = info["padded_hw"]

    def _on_qkv(self, linear: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        self._attn_in["qkv"] = out

    def _on_attn_end(self, attn: AnyWindowAttention, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        si, bi = self._ids[id(attn)]
        x, mask = self._attn_in["x"], self._attn_in["mask"]
        qkv_out = self._attn_in.get("qkv")
        self._attn_in = {}
        B_, N, C = x.shape
        h = attn.num_heads
        v2 = isinstance(attn, WindowAttentionV2)
        n_windows = 1 if mask is None else mask.shape[0]
        extra: dict[str, Any] = {}
        with torch.no_grad():
            if v2:
                # WindowAttentionV2 projects with F.linear (bias q_bias, 0, v_bias): no hook on
                # attn.qkv fires, so q, k, v come from the module's own projection of the windows.
                qkv = attn._qkv(x)  # 3, B·nW, heads, N, d
                # As the module: half types go to fp32 for the logits, fp32/fp64 stay as they are.
                if qkv.dtype in (torch.float16, torch.bfloat16):
                    qkv = qkv.float()
                linear_out = (B_, N, 3 * C)
                q, k, v = qkv.unbind(0)
                cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # B·nW, h, N, N
                scales = attn.logit_scales().to(q.dtype)  # h, 1, 1: 1/τ per head, clamped at 100
                bias = attn.relative_position_bias().to(q.dtype)  # h, N, N: 16·σ(MLP), in (0, 16)
                logits = cosine * scales + bias.unsqueeze(0)
                extra = {"cosine": cosine, "logit_scales": scales.view(-1)}
            else:
                # The model's own split of the qkv projection: (3, B·nW, heads, N, d).
                linear_out = _shape(qkv_out)
                qkv = qkv_out.float().reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
                logits = (q * attn.scale) @ k.transpose(-2, -1)  # B·nW, h, N, N
                bias = attn.relative_position_bias().float() if attn.use_rpb else None
                if bias is not None:
                    logits = logits + bias.unsqueeze(0)
            if mask is not None:
                logits = (logits.view(B_ // n_windows, n_windows, h, N, N) + mask.to(logits.dtype)[None, :, None]).view(
                    B_, h, N, N
                )
            maps = logits.softmax(dim=-1)
            # The maps are right iff they reproduce what the module returned.
            recon = attn.proj((maps @ v).transpose(1, 2).reshape(B_, N, C).to(attn.proj.weight.dtype))
            diff = float((recon.float() - out.float()).abs().max())
        qkv_info: dict[str, Any] = {
            "linear_out": linear_out,
            "heads": h,
            "head_dim": C // h,
            "source": "attn._qkv: F.linear, bias (q_bias, 0, v_bias)" if v2 else "attn.qkv Linear",
        }
        self.records.append(Record("qkv", stage=si, block=bi, shape_in=_shape(x), shape_out=_shape(qkv), info=qkv_info))
        info: dict[str, Any] = {
            "rpb": bias is not None,
            "check_max_abs_diff": diff,
            "mask_shape": None if mask is None else _shape(mask),
            "cosine": v2,
        }
        if v2:
            info.update(
                logit_scales=[float(s) for s in extra["logit_scales"]],
                cosine_range=(float(extra["cosine"].min()), float(extra["cosine"].max())),
                bias_range=(float(bias.min()), float(bias.max())),
            )
        else:
            info["scale"] = float(attn.scale)
        if mask is not None:
            info["masked_fraction"] = float((mask != 0).float().mean())
        self.records.append(
            Record("attention", stage=si, block=bi, shape_in=_shape(q), shape_out=_shape(maps), info=info)
        )
        self._await_reverse = _shape(out)
        if (si, bi) in self.keep:
            blk = self.model.layers[si - 1].blocks[bi - 1]
            rec = self._block_record
            kept: dict[str, Any] = {
                "maps": maps.detach().cpu(),
                "mask": None if mask is None else mask.detach().cpu(),
                "window_size": blk.window_size,
                "shift_size": blk.shift_size,
                "hw": tuple(rec.shape_in[1:3]) if rec is not None else None,
                "padded_hw": rec.info.get("padded_hw") if rec is not None else None,
                "logits": logits.detach().cpu(),  # before the softmax, bias and mask included
                "cosine": v2,
            }
            if v2:
                kept.update(
                    cosine_logits=extra["cosine"].detach().cpu(), logit_scales=extra["logit_scales"].detach().cpu()
                )
            self.maps[(si, bi)] = kept

    def _on_merge(self, module: AnyPatchMerging, args: tuple, out: torch.Tensor) -> None:
        si = self._stage_of[id(module)]
        self.records.append(
            Record(
                "patch_merging",
                stage=si,
                shape_in=_shape(args[0]),
                shape_out=_shape(out),
                info={"norm": "after reduction" if isinstance(module, PatchMergingV2) else "before reduction"},
            )
        )

    def _on_head(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.records.append(Record("head", shape_in=_shape(args[0]), shape_out=_shape(out)))

    # -- install / remove -----------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self) -> Iterator[_Tracer]:
        m = self.model
        reg = self._handles
        reg.append(m.patch_embed.register_forward_hook(self._on_patch_embed))
        for layer in m.layers:
            reg.append(layer.register_forward_pre_hook(self._on_stage_start))
            reg.append(layer.register_forward_hook(self._on_stage_end))
            for blk in layer.blocks:
                if not isinstance(blk, WindowBlockBase):
                    raise TypeError(f"explain walks Swin V1/V2 blocks (WindowBlockBase), not {type(blk).__name__}")
                reg.append(blk.register_forward_pre_hook(self._on_block_start))
                reg.append(blk.register_forward_hook(self._on_block_end))
                if is_v2_block(blk):
                    reg.append(blk.norm1.register_forward_hook(self._on_post_norm))
                    reg.append(blk.norm2.register_forward_hook(self._on_post_norm))
                else:
                    reg.append(blk.norm1.register_forward_hook(self._on_norm1))
                    reg.append(blk.attn.qkv.register_forward_hook(self._on_qkv))
                reg.append(blk.attn.register_forward_pre_hook(self._on_attn_start, with_kwargs=True))
                reg.append(blk.attn.register_forward_hook(self._on_attn_end, with_kwargs=True))
                if isinstance(getattr(blk, "drop_path", None), nn.Module):
                    reg.append(blk.drop_path.register_forward_pre_hook(self._on_drop_path))
            if layer.downsample is not None:
                reg.append(layer.downsample.register_forward_hook(self._on_merge))
        if isinstance(getattr(m, "head", None), nn.Module):
            reg.append(m.head.register_forward_hook(self._on_head))
        try:
            yield self
        finally:
            for handle in reg:
                handle.remove()
            reg.clear()


def trace(model: SwinTransformer, images: torch.Tensor, keep_maps: Sequence[BlockId] = ()) -> WalkResult:
    """Run ``model`` on ``images`` (B, C, H, W) in eval mode with the walk's hooks installed.

    Returns the records in the order the model produced them, the logits, and the attention maps
    (with the mask) of the blocks listed in ``keep_maps``. Adds per-stage parameters and MACs
    (the modules' own ``flops()``), the head's share and the totals.
    """
    was_training = model.training
    model.eval()
    tracer = _Tracer(model, keep_maps)
    try:
        with torch.no_grad(), tracer.installed():
            logits = model(images)
    finally:
        model.train(was_training)
    records = [Record("input", shape_out=_shape(images))] + tracer.records
    H, W = int(images.shape[-2]), int(images.shape[-1])
    embed_params = sum(p.numel() for p in model.patch_embed.parameters())
    if getattr(model, "ape", False):
        embed_params += model.absolute_pos_embed.numel()
    embed = find_record(records, "patch_embed")
    embed.info.update(params=embed_params, macs=int(model.patch_embed.flops(H, W)))
    total_macs = int(model.flops((H, W)))
    stage_macs = sum(r.info["macs"] for r in records if r.step == "stage_cost")
    head_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("norm.", "head.")))
    for r in records:
        if r.step == "head":
            r.info.update(params=head_params, macs=total_macs - embed.info["macs"] - stage_macs)
    records.append(Record("total", info={"params": sum(p.numel() for p in model.parameters()), "macs": total_macs}))
    return WalkResult(records=records, logits=logits, maps=tracer.maps)


def _with_img_size(config: CfgNode, img_size: int | None) -> CfgNode:
    if img_size is None or img_size == config.DATA.IMG_SIZE:
        return config
    config = config.clone()
    config.defrost()
    config.DATA.IMG_SIZE = int(img_size)
    config.freeze()
    return config


def build_for_walk(config: CfgNode, img_size: int | None = None, seed: int = 0) -> tuple[SwinTransformer, CfgNode]:
    """The classifier of ``config`` (at ``img_size`` if given) with seeded random weights, in eval mode."""
    from models import build_model

    config = _with_img_size(config, img_size)
    torch.manual_seed(seed)
    model = build_model(config)
    model.eval()
    return model, config


def walk(
    config: CfgNode,
    img_size: int | None = None,
    model: SwinTransformer | None = None,
    images: torch.Tensor | None = None,
) -> list[Record]:
    """The walk of one image through the model of ``config``: a list of :class:`Record`.

    Without ``model`` the model is built from ``config`` (random weights); without ``images`` a
    random (1, IN_CHANS, img_size, img_size) input is used (shapes do not depend on the pixels).
    """
    if model is None:
        model, config = build_for_walk(config, img_size)
    size = int(img_size or config.DATA.IMG_SIZE)
    if images is None:
        images = torch.randn(1, model_section(config).IN_CHANS, size, size, generator=torch.Generator().manual_seed(0))
    return trace(model, images).records


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------
def _x(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


def _map(shape: Sequence[int]) -> str:
    """(B, H, W, C) as H×W×C (per image)."""
    return _x(shape[1:]) if len(shape) == 4 else _x(shape)


def _m(n: float) -> str:
    return f"{n / 1e6:.2f} M"


def _g(n: float) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_walk(records: Sequence[Record], title: str = "") -> str:
    """The walk as text, one line per step (numbers as recorded)."""
    lines: list[str] = []
    inp = find_record(records, "input").shape_out
    batch = inp[0]
    lines.append(
        f"Walk of {'one' if batch == 1 else batch} {_x(inp[1:])} image{'s' if batch > 1 else ''} through "
        f"{title or 'the model'} (every shape from forward hooks on the real model; batch B = {batch})"
    )
    for r in records:
        if r.step == "patch_embed":
            _, h, w, c = r.shape_out
            p = r.info["patch_size"]
            lines.append(
                f"patch embedding   {_x(r.shape_in[1:])} image → {p}×{p} patches, Linear({r.shape_in[1] * p * p}→{c}) "
                f"→ {h}×{w} = {h * w:,} tokens of {c} channels   "
                f"[params {r.info['params']:,}, MACs {_g(r.info['macs'])}]"
            )
        elif r.step == "stage":
            _, h, w, c = r.shape_in
            shifts = ", ".join(str(s) for s in r.info["shifts"])
            lines.append("")
            lines.append(
                f"stage {r.stage}: {h}×{w} tokens × {c} ch, {r.info['depth']} blocks, {r.info['heads']} heads of "
                f"{r.info['head_dim']} ch, window {r.info['window_size']}×{r.info['window_size']}, shifts [{shifts}]"
            )
        elif r.step == "block":
            M, s = r.info["window_size"], r.info["shift_size"]
            nW = r.info.get("num_windows", "?")
            v2 = r.info.get("family") == "v2"
            order = ", res-post-norm (V2: attention on the raw input, LayerNorm after it)" if v2 else ""
            lines.append(
                f"  block {r.stage}.{r.block}  {r.info['kind']:<6} window {M}×{M}, shift {s}, "
                f"{nW} window{'' if nW == 1 else 's'}"
                f"{order}"
            )
        elif r.step == "window_partition":
            M, nW = r.info["window_size"], r.info["num_windows"]
            pad = ""
            if len(r.shape_in) == 4 and r.info.get("padded_hw") not in (None, tuple(r.shape_in[1:3])):
                pad = f"zero-pad to {_x(r.info['padded_hw'])}, "
            shift = f"roll by (-{r.info['shift_size']}, -{r.info['shift_size']}), " if r.info["shift_size"] else ""
            src = " (un-normalised block input)" if r.info.get("source", "").startswith("block input") else ""
            lines.append(
                f"    window partition  {_map(r.shape_in)}{src} → {pad}{shift}{nW} window{'' if nW == 1 else 's'} of "
                f"{M}×{M} tokens  (tensor {_x(r.shape_out)})"
            )
        elif r.step == "qkv":
            how = "Linear" if not r.info.get("source", "").startswith("attn._qkv") else "F.linear (bias q, 0, v)"
            lines.append(
                f"    qkv               {how} {_x(r.shape_in)} → {_x(r.info['linear_out'])} "
                f"= {_x(r.shape_out)} (q/k/v × windows × heads × tokens × head dim)"
            )
        elif r.step == "attention":
            mask = ""
            if r.info["mask_shape"]:
                mask = f", mask {_x(r.info['mask_shape'])} ({100 * r.info['masked_fraction']:.1f}% of pairs blocked)"
            if r.info.get("cosine"):
                extra = "softmax(cos(q, k)·1/τ + B" + (" + mask" if r.info["mask_shape"] else "") + ")"
                scales = ", ".join(f"{v:.3g}" for v in r.info["logit_scales"])
                lo, hi = r.info["cosine_range"]
                blo, bhi = r.info["bias_range"]
                extra += (
                    f", 1/τ per head [{scales}], cos in [{lo:.2f}, {hi:.2f}], B = 16·σ(MLP) in [{blo:.2f}, {bhi:.2f}]"
                )
            else:
                extra = (
                    "softmax(q·kᵀ·scale"
                    + (" + B" if r.info["rpb"] else "")
                    + (" + mask" if r.info["mask_shape"] else "")
                    + ")"
                )
            lines.append(
                f"    attention maps    {_x(r.shape_out)} (windows × heads × queries × keys) = {extra}{mask}; "
                f"reproduces the block's output to {r.info['check_max_abs_diff']:.1e}"
            )
        elif r.step == "post_norm":
            if r.info["branch"] == "attention":
                lines.append(
                    f"    post-norm         {r.info['norm']} = LayerNorm of the attention output {_map(r.shape_out)}, "
                    f"then x + drop_path(·)"
                )
            else:
                lines.append(f"    MLP, post-norm    x + drop_path({r.info['norm']}(MLP(x))) on {_map(r.shape_out)}")
        elif r.step == "window_reverse":
            back = (
                f" (rolled back by (+{r.info['shift_size']}, +{r.info['shift_size']}))" if r.info["shift_size"] else ""
            )
            lines.append(f"    window reverse    {_x(r.shape_in)} → {_map(r.shape_out)}{back}")
        elif r.step == "patch_merging":
            _, h0, w0, c0 = r.shape_in
            _, h1, w1, c1 = r.shape_out
            norm = ", LayerNorm after the reduction (V2)" if r.info.get("norm") == "after reduction" else ""
            lines.append(
                f"  patch merging     {h0}×{w0}×{c0} → {h1}×{w1}×{c1}: {h0 * w0:,} → {h1 * w1:,} tokens ({c1} ch){norm}"
            )
        elif r.step == "stage_cost":
            lines.append(
                f"  stage {r.stage} cost      params {r.info['params']:,} ({_m(r.info['params'])}), "
                f"MACs {_g(r.info['macs'])}"
            )
        elif r.step == "head":
            lines.append("")
            lines.append(
                f"head              LayerNorm, average pool, Linear {r.shape_in[-1]} → {r.shape_out[-1]} classes   "
                f"[params {r.info['params']:,}, MACs {_g(r.info['macs'])}]"
            )
        elif r.step == "total":
            lines.append(
                f"total             params {r.info['params']:,} ({_m(r.info['params'])}), MACs {_g(r.info['macs'])} "
                f"(model.flops(); per-stage MACs are the modules' flops())"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------
def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot state

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return path


@dataclass
class Geometry:
    """The feature map the window figures are drawn on."""

    height: int
    width: int
    window_size: int
    shift_size: int
    block: WindowBlockBase  # whose attention_mask() is drawn (V1 or V2: the same shift mask)
    note: str


def figure_geometry(model: SwinTransformer, max_side: int = 16) -> Geometry:
    """Stage 1's map and shifted block if the map is at most ``max_side`` tokens a side; else a
    2M×2M map with the configured M; else (M > ``max_side``/2) 8×8 with M=4."""
    layer = model.layers[0]
    H1, W1 = (int(v) for v in model.patches_resolution)
    M = layer.blocks[0].window_size
    shifted = next((b for b in layer.blocks if b.shift_size > 0), None)
    if shifted is not None:
        s = shifted.shift_size
        if max(H1, W1) <= max_side and H1 % M == 0 and W1 % M == 0:
            return Geometry(H1, W1, M, s, shifted, f"stage-1 feature map {H1}×{W1}, M={M}, shift {s}")
        if 2 * M <= max_side:
            return Geometry(
                2 * M, 2 * M, M, s, shifted, f"{2 * M}×{2 * M} map, configured M={M}, shift {s} (stage 1 is {H1}×{W1})"
            )
    # A stand-in block of the model's own family: its attention_mask() is the shared plumbing.
    blk = type(layer.blocks[0])(dim=4, num_heads=1, window_size=4, shift_size=2)
    why = f"configured M={M}" + ("" if shifted is not None else ", model does not shift")
    return Geometry(8, 8, 4, 2, blk, f"8×8 map with M=4, shift 2 for legibility ({why}, stage 1 is {H1}×{W1})")


def _window_ids(height: int, width: int, window_size: int, shift: int) -> torch.Tensor:
    """For each token of the map, the window it lands in after the model's (shift and) partition."""
    idx = torch.arange(height * width, dtype=torch.float32).view(1, height, width, 1)
    windows = shift_partition(idx, shift, window_size)  # nW, M, M, 1
    ids = torch.arange(windows.shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand_as(windows)
    # Undo the model's (shift and) partition on the ids: each token gets its window's number back.
    return reverse_unshift(ids.contiguous(), shift, window_size, height, width)[0, :, :, 0].long()


def _shifted_regions(height: int, width: int, window_size: int, shift: int) -> torch.Tensor:
    """The sub-windows of the shifted partition (paper Fig. 2, right): each cyclic window split
    where the tokens it gathers came from different sides of the wrap-around."""
    M, s = window_size, shift
    rows = (torch.arange(height) + M - s) // M
    cols = (torch.arange(width) + M - s) // M
    return rows[:, None] * int(cols.max() + 1) + cols[None, :]


def _palette():
    """Up to 60 distinct colours (tab20, tab20b, tab20c), so that regions rarely share one."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    colors = [c for name in ("tab20", "tab20b", "tab20c") for c in matplotlib.colormaps[name].colors]
    return ListedColormap(colors), len(colors)


def _show_ids(ax, ids: torch.Tensor):
    cmap, n = _palette()
    return ax.imshow(ids.numpy() % n, cmap=cmap, vmin=0, vmax=n - 1, alpha=0.55, interpolation="nearest")


def _grid(ax, height: int, width: int, window_size: int, offset: int, color: str = "black") -> None:
    """Token grid (thin) and window boundaries (thick) displaced by ``offset`` tokens."""
    for i in range(height + 1):
        ax.axhline(i - 0.5, color="0.75", lw=0.5)
    for j in range(width + 1):
        ax.axvline(j - 0.5, color="0.75", lw=0.5)
    for b in range(-window_size, max(height, width) + window_size, window_size):
        pos = b + offset
        if 0 <= pos <= height:
            ax.axhline(pos - 0.5, color=color, lw=2.2)
        if 0 <= pos <= width:
            ax.axvline(pos - 0.5, color=color, lw=2.2)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_windows(model: SwinTransformer, path: str) -> dict[str, Any]:
    """Paper Fig. 2: regular windows of layer l and shifted windows of layer l+1.

    Returns the window id of every token: 'regular' (the model's partition), 'shifted' (the
    sub-windows of the shifted partition), 'cyclic' (the model's shift + partition) and 'geometry'.
    """
    g = figure_geometry(model)
    H, W, M, s = g.height, g.width, g.window_size, g.shift_size
    regular = _window_ids(H, W, M, 0)
    shifted = _shifted_regions(H, W, M, s)
    cyclic = _window_ids(H, W, M, s)
    fig = _figure(10, 5.4)
    axes = fig.subplots(1, 2)
    im0 = _show_ids(axes[0], regular)
    _grid(axes[0], H, W, M, 0)
    axes[0].set_title(f"Layer l: regular windows (W-MSA)\n{int(regular.max()) + 1} windows of {M}×{M}")
    _show_ids(axes[1], shifted)
    _grid(axes[1], H, W, M, s % M, color="crimson")
    axes[1].set_title(
        f"Layer l+1: windows shifted by ({s}, {s}) (SW-MSA)\n{int(shifted.max()) + 1} windows, "
        f"computed as {int(cyclic.max()) + 1} by cyclic shift"
    )
    fig.suptitle(f"Shifted window partition (Swin paper Fig. 2) — {g.note}", fontsize=10)
    _save(fig, path)
    # Colours repeat every 60 windows; the ids themselves are returned.
    assert np.array_equal(np.asarray(im0.get_array()), regular.numpy() % _palette()[1])
    return {"regular": regular.numpy(), "shifted": shifted.numpy(), "cyclic": cyclic.numpy(), "geometry": g}


def _letters(n: int) -> list[str]:
    out = []
    for i in range(n):
        name, j = "", i
        while True:
            name = chr(ord("A") + j % 26) + name
            j = j // 26 - 1
            if j < 0:
                break
        out.append(name)
    return out


def _label_regions(ax, labels: torch.Tensor, names: list[str]) -> None:
    """Write each region's letter once, at the centre of its largest connected run."""
    H, W = labels.shape
    for v in torch.unique(labels).tolist():
        ys, xs = torch.nonzero(labels == v, as_tuple=True)
        ax.text(
            float(xs.float().mean()),
            float(ys.float().mean()),
            names[v],
            ha="center",
            va="center",
            fontsize=11 if H <= 16 else 8,
            fontweight="bold",
        )


def plot_cyclic_shift_mask(model: SwinTransformer, path: str) -> dict[str, Any]:
    """Paper Fig. 4: shifted-window regions before and after the cyclic roll, and the attention mask
    the batched windows need. The mask panels show ``block.attention_mask(H, W)`` of the model.

    Returns the arrays drawn: 'labels_before', 'labels_after' (H, W), 'mask' (nW, M², M²) read
    back from the drawn images, 'model_mask' (the block's mask), 'labels_agree' (whether
    "different region" matches "masked" for every pair in every window) and 'geometry'.
    """
    g = figure_geometry(model)
    H, W, M, s = g.height, g.width, g.window_size, g.shift_size
    model_mask = g.block.attention_mask(H, W, torch.device("cpu"))
    if model_mask is None:
        raise ValueError("the block drawn does not shift; no mask")
    before = _shifted_regions(H, W, M, s)
    label_map = before.float().view(1, H, W, 1)
    label_windows = shift_partition(label_map, s, M)  # the block's roll + partition
    after = window_reverse(label_windows, M, H, W)[0, :, :, 0].long()  # rolled map, windows in place
    flat = label_windows.view(-1, M * M)
    agree = bool(((flat[:, :, None] != flat[:, None, :]) == (model_mask != 0)).all())
    names = _letters(int(before.max()) + 1)
    nH, nW_ = H // M, W // M

    fig = _figure(15, 5.6, layout=None)
    outer = fig.add_gridspec(1, 3, width_ratios=[1, 1, 1.1], wspace=0.15)
    ax0 = fig.add_subplot(outer[0])
    _show_ids(ax0, before)
    _grid(ax0, H, W, M, s % M, color="crimson")
    _label_regions(ax0, before, names)
    ax0.set_title(f"Shifted windows, before the roll\n({len(names)} regions)", fontsize=10)
    ax1 = fig.add_subplot(outer[1])
    _show_ids(ax1, after)
    _grid(ax1, H, W, M, 0)
    _label_regions(ax1, after, names)
    ax1.set_title(
        f"After the cyclic shift torch.roll(-{s}, -{s}):\n{nH * nW_} regular windows, some mixing regions", fontsize=10
    )
    inner = outer[2].subgridspec(nH, nW_, wspace=0.08, hspace=0.08)
    drawn = []
    for w in range(nH * nW_):
        ax = fig.add_subplot(inner[w // nW_, w % nW_])
        im = ax.imshow(
            model_mask[w].numpy(), cmap="gray", vmin=float(model_mask.min()), vmax=0, interpolation="nearest"
        )
        drawn.append(np.asarray(im.get_array()))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"window {w}" if w else "mask, window 0", fontsize=8, pad=2)
    fig.text(
        0.99,
        0.02,
        f"mask: block.attention_mask({H}, {W}) = shift_attention_mask, {M * M}×{M * M} per window; "
        f"white 0 = attend, black {float(model_mask.min()):g} = blocked",
        ha="right",
        fontsize=8,
    )
    fig.suptitle(f"Cyclic shift and masked attention (Swin paper Fig. 4) — {g.note}", fontsize=11)
    _save(fig, path)
    return {
        "labels_before": before.numpy(),
        "labels_after": after.numpy(),
        "mask": np.stack(drawn),
        "model_mask": model_mask.numpy(),
        "labels_agree": agree,
        "geometry": g,
    }


def _block(model: SwinTransformer, block: BlockId) -> WindowBlockBase:
    si, bi = block
    if not 1 <= si <= len(model.layers) or not 1 <= bi <= len(model.layers[si - 1].blocks):
        depths = [len(layer.blocks) for layer in model.layers]
        raise UserError(f"--block {si}.{bi} does not exist; stages have {depths} blocks (numbered from 1)")
    return model.layers[si - 1].blocks[bi - 1]


def _check_head(blk: WindowBlockBase, head: int) -> None:
    if not 0 <= head < blk.num_heads:
        raise UserError(f"--head {head} does not exist; this block has heads 0..{blk.num_heads - 1}")


def plot_relative_position(
    model: SwinTransformer, path: str, block: BlockId = (1, 1), head: int = 0, weights: str = "random init"
) -> dict[str, Any]:
    """The relative position index (M²×M²) of a block and one head's bias B = relative_position_bias()[head],
    also as its (2M-1)×(2M-1) table over offsets (Δy, Δx).

    V1: the learned ``relative_position_bias_table`` (signed, drawn symmetric around 0). V2: the
    table the position-bias MLP computes, ``attn.bias_table()`` = 16·σ(cpb_mlp(Δ̂)) at the
    log-spaced offsets Δ̂ (always in (0, 16), drawn on that range). Returns the arrays drawn
    ('index' (M², M²), 'bias' (M², M²), 'table' (2M-1, 2M-1)), 'clim' (the colour range) and
    'kind' ('learned', 'mlp' or 'none').
    """
    blk = _block(model, block)
    _check_head(blk, head)
    attn = blk.attn
    v2 = isinstance(attn, WindowAttentionV2)
    M = attn.window_size
    index = attn.relative_position_index
    fig = _figure(16, 5.2)
    axes = fig.subplots(1, 3)
    im0 = axes[0].imshow(index.numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im0, ax=axes[0], fraction=0.046)
    axes[0].set_title(
        f"relative_position_index ({M * M}×{M * M})\nrow into the (2M-1)² = {(2 * M - 1) ** 2}-row table", fontsize=10
    )
    out: dict[str, Any] = {"index": np.asarray(im0.get_array()), "kind": "none"}
    if v2 or attn.use_rpb:
        with torch.no_grad():
            bias = attn.relative_position_bias()[head].detach().float().cpu()
            if v2:
                # The MLP's output at every offset: the table B is gathered from (V2 has no learned table).
                table = attn.bias_table()[:, head].detach().float().cpu().view(2 * M - 1, 2 * M - 1)
            else:
                table = attn.relative_position_bias_table[:, head].detach().float().cpu().view(2 * M - 1, 2 * M - 1)
        if v2:
            # 16·σ(·) is bounded in (0, 16): a fixed range keeps pictures of heads and checkpoints comparable.
            cmap, lim = "magma", (0.0, CPB_BIAS_SCALE)
            bias_title = f"B = relative_position_bias()[{head}] = 16·σ(cpb_mlp(Δ̂)) ({M * M}×{M * M}), range 0..16"
            # On the fixed range a barely trained MLP (≈8 everywhere) looks flat: say what it spans.
            table_title = (
                f"bias_table()[:, {head}] = 16·σ(cpb_mlp(log-spaced Δ̂)), "
                f"values {float(table.min()):.2f}..{float(table.max()):.2f}\n"
                f"as a {2 * M - 1}×{2 * M - 1} grid of offsets (computed by the MLP, not learned)"
            )
        else:
            m = float(bias.abs().max()) or 1.0
            cmap, lim = "RdBu_r", (-m, m)
            bias_title = f"B = relative_position_bias()[{head}] ({M * M}×{M * M})"
            table_title = f"the same head's learned table as a {2 * M - 1}×{2 * M - 1} grid of offsets"
        im1 = axes[1].imshow(bias.numpy(), cmap=cmap, vmin=lim[0], vmax=lim[1], interpolation="nearest")
        fig.colorbar(im1, ax=axes[1], fraction=0.046)
        axes[1].set_title(bias_title, fontsize=10)
        im2 = axes[2].imshow(
            table.numpy(),
            cmap=cmap,
            vmin=lim[0],
            vmax=lim[1],
            interpolation="nearest",
            extent=(-(M - 1) - 0.5, M - 1 + 0.5, M - 1 + 0.5, -(M - 1) - 0.5),
        )
        fig.colorbar(im2, ax=axes[2], fraction=0.046)
        axes[2].set_xlabel("Δx (query − key)")
        axes[2].set_ylabel("Δy (query − key)")
        axes[2].set_title(table_title, fontsize=10)
        out.update(
            bias=np.asarray(im1.get_array()),
            table=np.asarray(im2.get_array()),
            clim=lim,
            kind="mlp" if v2 else "learned",
        )
    else:
        for ax in axes[1:]:
            ax.axis("off")
        axes[1].text(0.5, 0.5, "MODEL.SWIN.RPB is off: no bias", ha="center", va="center")
    for ax in axes[:2]:
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
    what = (
        "Continuous position bias (Swin V2 Eq. 3–4: log-spaced offsets → MLP → 16·σ)"
        if v2
        else "Relative position bias (Swin paper Eq. 4)"
    )
    fig.suptitle(f"{what}, block {block[0]}.{block[1]}, M={M}, head {head}, weights: {weights}", fontsize=11)
    _save(fig, path)
    return out


def _query_windows(query: tuple[int, int], padded_hw: tuple[int, int], M: int, shift: int) -> tuple[int, int]:
    """(window, token) of a map position after the block's shift + partition (found by running it)."""
    Hp, Wp = padded_hw
    idx = torch.arange(Hp * Wp, dtype=torch.float32).view(1, Hp, Wp, 1)
    windows = shift_partition(idx, shift, M).view(-1, M * M)
    w, n = torch.nonzero(windows == query[0] * Wp + query[1], as_tuple=True)
    return int(w[0]), int(n[0])


def attention_heatmap(
    block_maps: dict[str, Any], head: int, query: tuple[int, int], image_index: int = 0, window_only: bool = False
) -> np.ndarray:
    """The attention of one query token over the keys of its window, placed on the (unpadded) map:
    the row of the map is put back through the window reverse + unshift. With ``window_only`` the
    result is instead 1 on the tokens of the query's window (masked keys included), 0 elsewhere."""
    maps = block_maps["maps"]
    M, s = block_maps["window_size"], block_maps["shift_size"]
    Hp, Wp = block_maps["padded_hw"]
    H, W = block_maps["hw"]
    n_windows = (Hp // M) * (Wp // M)
    w, n = _query_windows(query, (Hp, Wp), M, s)
    windows = torch.zeros(n_windows, M, M, 1)
    windows[w] = 1.0 if window_only else maps[image_index * n_windows + w, head, n].view(M, M, 1)
    heat = reverse_unshift(windows, s, M, Hp, Wp)[0, :H, :W, 0]
    return heat.numpy()


def default_queries(hw: tuple[int, int]) -> list[tuple[int, int]]:
    H, W = hw
    qs = [(H // 2, W // 2), (H // 4, W // 4), (H // 4, (3 * W) // 4), (H - 1, W - 1)]
    out: list[tuple[int, int]] = []
    for q in qs:
        if q not in out:
            out.append(q)
    return out


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised tensor → (H, W, 3) in [0, 1]."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_attention(
    model: SwinTransformer,
    image: torch.Tensor,
    path: str,
    block: BlockId,
    head: int = 0,
    queries: Sequence[tuple[int, int]] | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Attention maps of ``block``/``head`` for a few query tokens, upsampled on top of ``image``
    (3, H, W, already preprocessed), plus the full N×N map of the first query's window.

    The maps are the walk's (V1: softmax(q·kᵀ·scale + B + mask); V2: softmax(cos(q, k)·1/τ + B +
    mask)), checked there to reproduce the attention module's output.

    Returns 'heatmaps' (one (H_tokens, W_tokens) array per query), 'queries', 'window_map' (the
    (M², M²) maps of window 'window', the first query's, image 0) and 'prediction' (class
    index, probability)."""
    blk = _block(model, block)
    _check_head(blk, head)
    result = trace(model, image.unsqueeze(0), keep_maps=[block])
    bm = result.maps[block]
    H, W = bm["hw"]
    M, s = bm["window_size"], bm["shift_size"]
    Hp, Wp = bm["padded_hw"]
    queries = list(queries) if queries else default_queries((H, W))
    for q in queries:
        if not (0 <= q[0] < H and 0 <= q[1] < W):
            raise UserError(f"query token {q[0]},{q[1]} is outside the {H}×{W} map of block {block[0]}.{block[1]}")
    probs = result.logits.float().softmax(-1)[0]
    p, c = (float(v) for v in probs.max(0))
    cls = int(c)
    cls_name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
    img = denormalize(image)
    ih, iw = img.shape[:2]
    sy, sx = ih / H, iw / W  # pixels per token of this stage
    extent = (0, W * sx, H * sy, 0)
    heatmaps = [attention_heatmap(bm, head, q) for q in queries]
    w0, _ = _query_windows(queries[0], (Hp, Wp), M, s)
    window_map = bm["maps"][w0, head].numpy()

    n_panels = 2 + len(queries)
    cols = 3
    rows = math.ceil(n_panels / cols)
    fig = _figure(4.2 * cols, 4.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.axis("off")

    def window_lines(ax) -> None:
        for b in range(0, Hp + 1, M):
            pos = (b + s) % Hp if s else b
            if pos <= H:
                ax.axhline(pos * sy, color="white", lw=0.8, ls="--", alpha=0.8)
        for b in range(0, Wp + 1, M):
            pos = (b + s) % Wp if s else b
            if pos <= W:
                ax.axvline(pos * sx, color="white", lw=0.8, ls="--", alpha=0.8)

    axes[0].imshow(img, extent=extent)
    window_lines(axes[0])
    axes[0].set_title(
        f"input {ih}×{iw}; block {block[0]}.{block[1]} windows\n({H}×{W} tokens, M={M}, shift {s})", fontsize=9
    )
    for i, (q, heat) in enumerate(zip(queries, heatmaps, strict=True)):
        ax = axes[1 + i]
        ax.imshow(img.mean(axis=2), cmap="gray", extent=extent)
        inside = attention_heatmap(bm, head, q, window_only=True) > 0
        blocked = inside & (heat < 1e-20)  # keys the shift mask hides from this query
        ax.imshow(
            np.ma.masked_where(~inside | blocked, heat),
            cmap="inferno",
            alpha=0.7,
            extent=extent,
            interpolation="nearest",
            vmin=0,
            vmax=float(heat.max()) or 1.0,
        )
        if blocked.any():
            from matplotlib.colors import ListedColormap

            ax.imshow(
                np.ma.masked_where(~blocked, blocked.astype(float)),
                cmap=ListedColormap(["#3b6cff"]),
                alpha=0.55,
                extent=extent,
                interpolation="nearest",
            )
        window_lines(ax)
        ax.add_patch(_rect(q[1] * sx, q[0] * sy, sx, sy))
        ax.set_title(
            f"query token ({q[0]}, {q[1]}): attention over its window\n"
            f"max {heat.max():.2f}" + (", blue = masked keys" if blocked.any() else ""),
            fontsize=9,
        )
    ax = axes[1 + len(queries)]
    im = ax.imshow(window_map, cmap="inferno", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"all {M * M}×{M * M} maps of the first query's window #{w0}", fontsize=9)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    for a in axes[: 1 + len(queries)]:
        a.set_xticks([])
        a.set_yticks([])
    kind = "SW-MSA" if s else "W-MSA"
    if bm["cosine"]:
        kind += f", scaled cosine attention, 1/τ = {float(bm['logit_scales'][head]):.3g}"
    fig.suptitle(
        f"{title + ': ' if title else ''}attention of block {block[0]}.{block[1]} ({kind}), head {head}; "
        f"predicted {cls_name} ({100 * p:.1f}%)",
        fontsize=11,
    )
    _save(fig, path)
    return {"heatmaps": heatmaps, "queries": queries, "window_map": window_map, "window": w0, "prediction": (cls, p)}


def _rect(x: float, y: float, w: float, h: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor="cyan", lw=2)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_block(text: str) -> BlockId:
    try:
        s, b = text.split(".")
        return int(s), int(b)
    except ValueError:
        raise UserError(f"--block takes STAGE.BLOCK counted from 1, e.g. 1.2; got {text!r}") from None


def parse_queries(items: Sequence[str] | None) -> list[tuple[int, int]] | None:
    if not items:
        return None
    out = []
    for item in items:
        try:
            r, c = item.split(",")
            out.append((int(r), int(c)))
        except ValueError:
            raise UserError(f"--queries takes ROW,COL token positions, e.g. 8,8; got {item!r}") from None
    return out


def default_block(model: SwinTransformer) -> BlockId:
    """The first shifted block of stage 1 (its attention shows the mask at work), else block 1.1."""
    for bi, blk in enumerate(model.layers[0].blocks, 1):
        if blk.shift_size:
            return (1, bi)
    return (1, 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", help="config YAML (default with --resume: the config stored in the checkpoint)")
    p.add_argument("--opts", nargs="+", default=None, help="config overrides: KEY VALUE pairs")
    p.add_argument("--img-size", type=int, help="input size to walk (default DATA.IMG_SIZE)")
    p.add_argument(
        "--out", default=os.path.join("output", "explain"), help="folder for the pictures (default output/explain)"
    )
    p.add_argument("--resume", help="checkpoint whose weights to use (bias picture, attention maps)")
    p.add_argument("--image", help="image to walk and draw attention maps for (needs --resume)")
    p.add_argument(
        "--block",
        help="STAGE.BLOCK counted from 1 for the bias and attention pictures "
        "(default: the first shifted block of stage 1)",
    )
    p.add_argument("--head", type=int, default=0, help="attention head, counted from 0 (default 0)")
    p.add_argument("--queries", nargs="+", help="query tokens ROW,COL on the block's map for attention.png")
    p.add_argument("--no-pictures", action="store_true", help="print the walk only")
    return p.parse_args(argv)


def load_config(cfg: str | None, opts: Sequence[str] | None) -> CfgNode:
    """The config of a walk without a checkpoint: ``--cfg`` with ``--opts``."""
    from config import get_config

    if cfg:
        return get_config(cfg, opts)
    raise UserError("pass --cfg (or --resume with a checkpoint that stores its config)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from checkpoint import load_checkpoint_file
    from config import config_for_checkpoint
    from data.build import build_transform
    from data.class_names import resolve_class_names
    from data.robust import load_rgb
    from models import load_weights

    if args.image and not args.resume:
        raise UserError("--image draws the attention of trained weights; pass --resume CKPT as well")
    if args.image and not os.path.isfile(args.image):
        raise UserError(f"image {args.image} does not exist")
    checkpoint = load_checkpoint_file(args.resume) if args.resume else None
    if checkpoint is not None:
        config = config_for_checkpoint(checkpoint, args.cfg, args.opts, source=args.resume)
    else:
        config = load_config(args.cfg, args.opts)
    class_names: list[str] | None = None
    model, config = build_for_walk(config, args.img_size)
    weights = "random init (seed 0)"
    if checkpoint is not None:
        load_weights(model, checkpoint, "inference", name=args.resume)
        class_names = resolve_class_names(checkpoint, config.MODEL.NUM_CLASSES)
        weights = os.path.basename(args.resume)
    size = int(config.DATA.IMG_SIZE)
    if args.image:
        image = build_transform(False, config)(load_rgb(args.image))
        if args.img_size and tuple(image.shape[-2:]) != (size, size):
            raise UserError("--img-size must match the checkpoint's preprocessing when --image is given")
        images = image.unsqueeze(0)
    else:
        images = torch.randn(1, model_section(config).IN_CHANS, size, size, generator=torch.Generator().manual_seed(0))
    result = trace(model, images)
    print(format_walk(result.records, f"{config.MODEL.NAME} at {size}×{size}"))
    written: dict[str, str] = {}
    if not args.no_pictures:
        block = parse_block(args.block) if args.block else default_block(model)
        out = args.out
        plot_windows(model, os.path.join(out, "windows.png"))
        written["windows"] = os.path.join(out, "windows.png")
        plot_cyclic_shift_mask(model, os.path.join(out, "cyclic_shift_mask.png"))
        written["cyclic_shift_mask"] = os.path.join(out, "cyclic_shift_mask.png")
        plot_relative_position(model, os.path.join(out, "relative_position.png"), block, args.head, weights)
        written["relative_position"] = os.path.join(out, "relative_position.png")
        if args.image:
            info = plot_attention(
                model,
                images[0],
                os.path.join(out, "attention.png"),
                block,
                args.head,
                parse_queries(args.queries),
                class_names,
                title=os.path.basename(args.image),
            )
            written["attention"] = os.path.join(out, "attention.png")
            print(
                f"\nprediction for {args.image}: "
                f"{class_names[info['prediction'][0]] if class_names else info['prediction'][0]} "
                f"({100 * info['prediction'][1]:.1f}%)"
            )
        print()
        for path in written.values():
            print(f"wrote {path}")
    return {"records": result.records, "pictures": written}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
