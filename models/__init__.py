"""Swin Transformer models: ``build_model(config)`` and ``load_weights(model, source, purpose)``."""

from models.build import build_model
from models.compile import COMPILE_SCOPES, compile_model
from models.pretrained import LoadReport, imagenet22k_to_1k_indices, load_pretrained, load_weights
from models.swin_transformer import SwinBackbone, SwinTransformer
from models.swin_transformer_v2 import SwinBackboneV2, SwinTransformerV2

__all__ = [
    "build_model",
    "compile_model",
    "COMPILE_SCOPES",
    "load_pretrained",
    "load_weights",
    "LoadReport",
    "imagenet22k_to_1k_indices",
    "SwinTransformer",
    "SwinBackbone",
    "SwinTransformerV2",
    "SwinBackboneV2",
]
