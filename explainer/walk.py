"""The walk of one image through a Swin Transformer (V1 or V2), read off the real model by forward hooks.

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
walk checks and reports. ``format_walk`` prints the records, one line per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from config import model_section
from models.swin_transformer import BasicLayer, PatchEmbed, PatchMerging, SwinTransformer, WindowAttention
from models.swin_transformer_v2 import PatchMergingV2, SwinTransformerBlockV2, WindowAttentionV2, _full_precision
from models.windows import WindowBlockBase, pad_to_multiple

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
    padded = pad_to_multiple(torch.empty(1, height, width, 0), window_size)
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
                # As the module: half types go to fp32 for the logits, fp32/fp64 stay as they are.
                qkv = _full_precision(attn._qkv(x))  # 3, B·nW, heads, N, d
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
