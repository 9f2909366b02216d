"""Data pipeline: transforms, datasets (ImageFolder, ImageNet-22K lists), samplers and loaders."""

from .build import DataBundle, build_dataset, build_loader, build_transform
from .robust import RobustImageDataset, UnreadableImageError
from .samplers import ExactEvalSampler, ResumableSampler

__all__ = [
    "DataBundle",
    "ExactEvalSampler",
    "ResumableSampler",
    "RobustImageDataset",
    "UnreadableImageError",
    "build_dataset",
    "build_loader",
    "build_transform",
]
