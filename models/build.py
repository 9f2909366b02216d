"""Model construction from the config."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from yacs.config import CfgNode

from errors import UserError
from models.swin_transformer import ATTN_IMPLS, SwinBackbone, SwinTransformer


def swin_kwargs(config: CfgNode) -> dict:
    """Constructor arguments of the Swin trunk, from ``MODEL.*`` and ``DATA.IMG_SIZE``."""
    s = config.MODEL.SWIN
    return dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=s.PATCH_SIZE,
        in_chans=s.IN_CHANS,
        embed_dim=s.EMBED_DIM,
        depths=list(s.DEPTHS),
        num_heads=list(s.NUM_HEADS),
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        qk_scale=s.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=s.APE,
        patch_norm=s.PATCH_NORM,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        shift=s.SHIFT,
        use_rpb=s.RPB,
        attn_impl=s.ATTN_IMPL,
        fused_window_process=config.FUSED_WINDOW_PROCESS,
    )


def build_model(
    config: CfgNode,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    frozen_stages: int = -1,
) -> nn.Module:
    """The classifier of ``config`` (``MODEL.TYPE: swin``), or with ``features_only`` the backbone."""
    if config.MODEL.TYPE != "swin":
        raise UserError(f"MODEL.TYPE {config.MODEL.TYPE!r} is not supported; use 'swin'")
    s = config.MODEL.SWIN
    if len(s.DEPTHS) != len(s.NUM_HEADS):
        raise UserError(f"MODEL.SWIN.DEPTHS {list(s.DEPTHS)} and NUM_HEADS {list(s.NUM_HEADS)} differ in length; give one head count per stage")
    for i, heads in enumerate(s.NUM_HEADS):
        dim = s.EMBED_DIM * 2**i
        if dim % heads:
            raise UserError(f"stage {i} has {dim} channels, not divisible by {heads} heads; fix MODEL.SWIN.EMBED_DIM or NUM_HEADS")
    if s.ATTN_IMPL not in ATTN_IMPLS:
        raise UserError(f"MODEL.SWIN.ATTN_IMPL must be one of {', '.join(map(repr, ATTN_IMPLS))}, not {s.ATTN_IMPL!r}")
    kwargs = swin_kwargs(config)
    if features_only:
        return SwinBackbone(out_indices=out_indices, frozen_stages=frozen_stages, **kwargs)
    return SwinTransformer(num_classes=config.MODEL.NUM_CLASSES, **kwargs)
