"""Model construction from the config: ``MODEL.TYPE`` picks the family, its section the shape."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from yacs.config import CfgNode

from config import check_model_section, is_pretraining, model_section
from errors import UserError
from models.simmim import SimMIM
from models.swin_transformer import ATTN_IMPLS, SwinBackbone, SwinTransformer
from models.swin_transformer_v2 import SwinBackboneV2, SwinTransformerV2


def swin_kwargs(config: CfgNode) -> dict:
    """Constructor arguments of the trunk, from ``MODEL.*``, the family's section and ``DATA.IMG_SIZE``."""
    s = model_section(config)
    kwargs = dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=s.PATCH_SIZE,
        in_chans=s.IN_CHANS,
        embed_dim=s.EMBED_DIM,
        depths=list(s.DEPTHS),
        num_heads=list(s.NUM_HEADS),
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=s.APE,
        patch_norm=s.PATCH_NORM,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        attn_impl=s.ATTN_IMPL,
        fused_window_process=config.FUSED_WINDOW_PROCESS,
    )
    if config.MODEL.TYPE == "swinv2":
        kwargs["pretrained_window_sizes"] = list(s.PRETRAINED_WINDOW_SIZES)
    else:
        kwargs.update(qk_scale=s.QK_SCALE, shift=s.SHIFT, use_rpb=s.RPB)
    return kwargs


def _check_shape(config: CfgNode) -> None:
    check_model_section(config)
    s = model_section(config)
    section = f"MODEL.{'SWINV2' if config.MODEL.TYPE == 'swinv2' else 'SWIN'}"
    if len(s.DEPTHS) != len(s.NUM_HEADS):
        raise UserError(
            f"{section}.DEPTHS {list(s.DEPTHS)} and NUM_HEADS {list(s.NUM_HEADS)} differ in length; "
            "give one head count per stage"
        )
    for i, heads in enumerate(s.NUM_HEADS):
        dim = s.EMBED_DIM * 2**i
        if dim % heads:
            raise UserError(
                f"stage {i} has {dim} channels, not divisible by {heads} heads; fix {section}.EMBED_DIM or NUM_HEADS"
            )
    if s.ATTN_IMPL not in ATTN_IMPLS:
        raise UserError(f"{section}.ATTN_IMPL must be one of {', '.join(map(repr, ATTN_IMPLS))}, not {s.ATTN_IMPL!r}")
    if config.MODEL.TYPE == "swinv2":
        sizes = list(s.PRETRAINED_WINDOW_SIZES)
        if len(sizes) != len(s.DEPTHS):
            raise UserError(
                f"MODEL.SWINV2.PRETRAINED_WINDOW_SIZES {sizes} has {len(sizes)} entries for {len(s.DEPTHS)} stages; "
                "give one window per stage (0 = this model's own)"
            )
        if any(int(w) < 0 for w in sizes):
            raise UserError(
                f"MODEL.SWINV2.PRETRAINED_WINDOW_SIZES {sizes} must not be negative (0 = this model's own window)"
            )


def build_model(
    config: CfgNode,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    frozen_stages: int = -1,
) -> nn.Module:
    """The classifier of ``config`` (``MODEL.TYPE`` 'swin' or 'swinv2') with ``num_classes`` outputs
    (default ``MODEL.NUM_CLASSES``), with ``features_only`` the backbone, and for
    ``TRAIN.PRETRAIN simmim`` the SimMIM model around a head-less encoder."""
    _check_shape(config)
    kwargs = swin_kwargs(config)
    v2 = config.MODEL.TYPE == "swinv2"
    if is_pretraining(config) and not features_only:
        encoder = (SwinTransformerV2 if v2 else SwinTransformer)(num_classes=0, **kwargs)
        target = config.MODEL.SIMMIM.NORM_TARGET
        return SimMIM(encoder, norm_target=bool(target.ENABLE), norm_target_window=int(target.PATCH_SIZE))
    if features_only:
        backbone = SwinBackboneV2 if v2 else SwinBackbone
        return backbone(out_indices=out_indices, frozen_stages=frozen_stages, **kwargs)
    classifier = SwinTransformerV2 if v2 else SwinTransformer
    return classifier(num_classes=config.MODEL.NUM_CLASSES if num_classes is None else num_classes, **kwargs)
