"""Transforms, datasets and data loaders from the config (the official ``data/build.py`` contract).

``build_loader`` is the entry point of the trainer; ``build_dataset`` and ``build_transform``
are its parts. Nothing here mutates the (frozen) config: the number of classes comes back
in the result, and the trainer stores it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode

from allocator import retain_freed_memory, retain_freed_memory_in_worker
from config import is_pretraining
from errors import UserError
from preemption import ignore_stop_signals

from .fast_transforms import FastEvalTransform, FastTrainTransform, deferred_to_batch, training_pipeline
from .imagenet22k import NUM_CLASSES_22K, ImageNet22KList, annotation_file
from .robust import RobustImageDataset, load_rgb
from .samplers import ExactEvalSampler, ResumableSampler
from .shards import build_shard_dataset, build_shard_sampler
from .simmim import SimMIMTransform, build_pretraining_dataset, pretraining_folders
from .uint8_batches import collate_samples
from .zip_dataset import build_zip_dataset

logger = logging.getLogger(__name__)

DATASETS = ("imagenet", "imagenet22K")
# 'random' picks bilinear or bicubic per image in training (timm); evaluation then uses bilinear.
INTERPOLATIONS = ("random", "bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
MIXUP_MODES = ("batch", "pair", "elem")
# Below this size the official release treats inputs as CIFAR-like: pad-and-crop, no resize-crop.
SMALL_IMAGE_SIZE = 32


def _list_preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# -----------------------------------------------------------------------------
# Transforms
# -----------------------------------------------------------------------------
def _interpolation(config: CfgNode) -> str:
    name = config.DATA.INTERPOLATION
    if name not in INTERPOLATIONS:
        raise UserError(f"DATA.INTERPOLATION is {name!r}; use one of {', '.join(INTERPOLATIONS)}")
    return name


def build_transform(is_train: bool, config: CfgNode, uint8_output: bool = False) -> Callable:
    """The image transform: PIL RGB image -> float tensor of shape (3, IMG_SIZE, IMG_SIZE).

    ``uint8_output`` (``build_dataset`` sets it under DATA.PIPELINE fast): the image comes out as
    a ``data.uint8_batches.Uint8Image`` instead, which the loader collates into a ``Uint8Batch``
    that the trainer normalises (and erases) on the model's device, bit-identically.

    Training: timm's ``create_transform`` (random resized crop, flip, RandAugment or color
    jitter, normalization, random erasing) from the AUG keys; for IMG_SIZE <= 32 the random
    resized crop becomes ``RandomCrop(IMG_SIZE, padding=4)`` as in the official release
    (with ``pad_if_needed`` so that smaller inputs are padded rather than rejected). With
    DATA.PIPELINE 'fast' that Compose is wrapped in ``data.fast_transforms.FastTrainTransform``
    (same steps and random draws; decodes JPEGs at reduced size when the crop allows, and also
    takes undecoded files); 'reference' returns timm's Compose itself.
    Evaluation: with TEST.CROP, resize the short side to ``int(256 / 224 * IMG_SIZE)`` and
    center-crop IMG_SIZE; without it (and always for IMG_SIZE <= 32, where the official
    release does not crop) resize straight to IMG_SIZE x IMG_SIZE; then ImageNet normalization.
    """
    size = int(config.DATA.IMG_SIZE)
    if size < 1:
        raise UserError(f"DATA.IMG_SIZE is {size}; use a positive image size such as 224")
    interpolation = _interpolation(config)

    if is_train:
        pipeline = training_pipeline(config)
        auto_augment = config.AUG.AUTO_AUGMENT
        if auto_augment in (None, "", "none"):
            auto_augment = None
        try:
            transform = create_transform(
                input_size=size,
                is_training=True,
                color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
                auto_augment=auto_augment,
                re_prob=config.AUG.REPROB,
                re_mode=config.AUG.REMODE,
                re_count=config.AUG.RECOUNT,
                interpolation=interpolation,
            )
        except (AssertionError, KeyError, ValueError) as e:
            # timm rejects malformed policy strings with bare asserts/lookups; name the keys instead.
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"timm cannot build the training transform ({detail}); check AUG.AUTO_AUGMENT "
                f"{config.AUG.AUTO_AUGMENT!r}, AUG.REMODE {config.AUG.REMODE!r} and AUG.COLOR_JITTER"
            ) from e
        if size <= SMALL_IMAGE_SIZE:
            steps = transform.transforms
            crops = [i for i, t in enumerate(steps) if isinstance(t, RandomResizedCropAndInterpolation)]
            if len(crops) != 1:
                raise RuntimeError(f"expected one RandomResizedCrop in timm's train transform, found {steps}")
            # pad_if_needed: inputs smaller than IMG_SIZE - 8 are padded instead of failing in a worker.
            steps[crops[0]] = transforms.RandomCrop(size, padding=4, pad_if_needed=True)
        if pipeline == "reference":
            return transform
        # DATA.STRICT fails on any damaged file: decode every JPEG whole so damage below a crop is seen.
        return FastTrainTransform(transform, uint8_output=uint8_output, partial_decode=not config.DATA.STRICT)

    # Evaluation never picks at random; 'random' falls back to bilinear like the official release.
    mode = transforms.InterpolationMode(interpolation if interpolation != "random" else "bilinear")
    steps: list[Callable] = []
    if config.TEST.CROP and size > SMALL_IMAGE_SIZE:
        steps.append(transforms.Resize(int((256 / 224) * size), interpolation=mode))
        steps.append(transforms.CenterCrop(size))
    else:
        steps.append(transforms.Resize((size, size), interpolation=mode))
    steps.append(transforms.ToTensor())
    steps.append(transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    if not uint8_output:
        return transforms.Compose(steps)
    # Only the crop of the resize is computed, in C with Pillow's arithmetic: the same bytes.
    return FastEvalTransform(transforms.Compose(deferred_to_batch(steps)))


# -----------------------------------------------------------------------------
# Datasets
# -----------------------------------------------------------------------------
class _VisibleImageFolder(ImageFolder):
    """ImageFolder that ignores hidden folders (``.ipynb_checkpoints``, ``.DS_Store`` dirs) as classes."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(directory)
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {c: i for i, c in enumerate(classes)}


def _class_folders(directory: str) -> list[str]:
    """Sorted names of the visible sub-folders of ``directory``."""
    with os.scandir(directory) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _check_data_path(root: str) -> None:
    if not root:
        raise UserError("--data-path is not set; point --data-path at a folder holding train/ and val/")
    if not os.path.isdir(root):
        raise UserError(f"--data-path {root} does not exist; point --data-path at a folder holding train/ and val/")


def _check_split_folders(root: str) -> list[str]:
    """Check ``root/train`` and ``root/val`` hold the same class folders; return the class names."""
    names: dict[str, list[str]] = {}
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise UserError(
                f"{split_dir} does not exist; --data-path must hold train/ and val/, each with one folder per class"
            )
        names[split] = _class_folders(split_dir)
        if not names[split]:
            raise UserError(f"{split_dir} holds no class folders; put each class's images in {split_dir}/<class>/")
    only_train = sorted(set(names["train"]) - set(names["val"]))
    only_val = sorted(set(names["val"]) - set(names["train"]))
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append(f"only in train/: {_list_preview(only_train)}")
        if only_val:
            parts.append(f"only in val/: {_list_preview(only_val)}")
        raise UserError(
            f"train/ and val/ of {root} have different class folders ({'; '.join(parts)}); "
            f"give both splits the same class folders"
        )
    return names["train"]


def _has_class_folders(split_dir: str) -> bool:
    return os.path.isdir(split_dir) and bool(_class_folders(split_dir))


def _image_folder(root: str, split: str, transform: Callable) -> ImageFolder:
    split_dir = os.path.join(root, split)
    # allow_empty: a class may lack images in one split; an entirely empty split is refused below.
    folder = _VisibleImageFolder(split_dir, transform=transform, loader=load_rgb, allow_empty=True)
    if not folder.samples:
        raise UserError(
            f"the class folders of {split_dir} hold no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); "
            f"put the images inside {split_dir}/<class>/"
        )
    counts = [0] * len(folder.classes)
    for _, target in folder.samples:
        counts[target] += 1
    empty = [c for c, n in zip(folder.classes, counts, strict=True) if n == 0]
    if empty:
        logger.warning("%d class folders of %s hold no images: %s", len(empty), split_dir, _list_preview(empty))
    return folder


def _process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: the process group's, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _loader_transform(is_train: bool, config: CfgNode) -> Callable:
    """The transform a dataset for the loader applies: under DATA.PIPELINE fast its samples stay
    uint8 until the batch is on the model's device (``data/uint8_batches.py``)."""
    return build_transform(is_train, config, uint8_output=training_pipeline(config) == "fast")


def build_dataset(
    is_train: bool,
    config: CfgNode,
    substitute: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[RobustImageDataset, int]:
    """The train or val dataset and the number of classes of the model.

    Returns ``(dataset, num_classes)``; ``dataset[i]`` is ``(image, target)`` as described in
    ``RobustImageDataset`` (the image a ``Uint8Image`` under DATA.PIPELINE fast) and
    ``dataset.classes`` lists the class names; unreadable samples are marked in
    ``dataset.replacements``. ``substitute`` (default: ``is_train``) says whether an
    unreadable file is replaced by the next readable sample (training) or comes back as a
    placeholder with target -1 for the caller to exclude (evaluation, so the metrics are over the
    named files only); ``DATA.STRICT`` raises instead.
    DATA.DATASET 'imagenet': ImageFolder over ``DATA_PATH/train`` or ``DATA_PATH/val``,
    ``num_classes`` = number of class folders. 'imagenet22K': the same folder layout when
    present, else the official annotation lists ``ILSVRC2011fall_whole_map_{train,val}.txt``;
    ``num_classes`` is 21,841 either way. With DATA.ZIP_MODE ('imagenet' only): the zip layout
    ``{train,val}.zip`` + ``{train,val}_map.txt`` read by ``data/zip_dataset.py``, ``num_classes``
    = largest label + 1, cached per DATA.CACHE_MODE for ``rank`` of ``world_size`` (default: the
    process group's; the train set is not cached under EVAL_MODE). With DATA.FORMAT shards: the
    tar shards of DATA.SHARDS_TRAIN / SHARDS_VAL as a ``data.shards.ShardDataset`` (same item
    format). Raises ``UserError`` for a missing or inconsistent dataset.
    """
    root = config.DATA.DATA_PATH
    kind = config.DATA.DATASET
    if kind not in DATASETS:
        raise UserError(f"DATA.DATASET is {kind!r}; use 'imagenet' (any ImageFolder) or 'imagenet22K'")
    if config.DATA.FORMAT == "shards":
        # WebDataset-style tar shards (data/shards.py); DATA_PATH is only their default location.
        shard_substitute = is_train if substitute is None else substitute
        cap = NUM_CLASSES_22K if kind == "imagenet22K" else None
        return build_shard_dataset(config, is_train, _loader_transform(is_train, config), shard_substitute, cap)
    _check_data_path(root)
    if config.DATA.ZIP_MODE and kind == "imagenet22K":
        raise UserError(
            "--zip reads the ImageNet-1K zip layout only; ImageNet-22K from zips is not supported yet: "
            "drop --zip and use the 22K class folders or annotation lists"
        )
    transform = _loader_transform(is_train, config)
    split = "train" if is_train else "val"

    if config.DATA.ZIP_MODE:
        group_rank, group_size = _process_rank()
        # --eval never reads the train set: caching it would only cost time and memory.
        cache_mode = "no" if is_train and config.EVAL_MODE else str(config.DATA.CACHE_MODE)
        base, num_classes = build_zip_dataset(
            root,
            is_train,
            transform,
            cache_mode,
            rank=group_rank if rank is None else rank,
            world_size=group_size if world_size is None else world_size,
        )
    elif kind == "imagenet22K" and not (
        _has_class_folders(os.path.join(root, "train")) and _has_class_folders(os.path.join(root, "val"))
    ):
        base: Any = ImageNet22KList(root, annotation_file(root, is_train), transform=transform)
        num_classes = NUM_CLASSES_22K
    else:
        classes = _check_split_folders(root)
        base = _image_folder(root, split, transform)
        if kind == "imagenet22K":
            if len(classes) > NUM_CLASSES_22K:
                raise UserError(
                    f"{root} has {len(classes)} class folders but ImageNet-22K has {NUM_CLASSES_22K}; "
                    f"use DATA.DATASET imagenet for other datasets"
                )
            if len(classes) < NUM_CLASSES_22K:
                logger.warning(
                    "%s has %d class folders; the ImageNet-22K head keeps %d outputs",
                    root,
                    len(classes),
                    NUM_CLASSES_22K,
                )
            num_classes = NUM_CLASSES_22K
        else:
            num_classes = len(classes)

    # Evaluation never substitutes: a stand-in image would be scored as if it were the unreadable one.
    substitute = is_train if substitute is None else substitute
    dataset = RobustImageDataset(base, strict=bool(config.DATA.STRICT), substitute=substitute)
    logger.info("%s set: %d images, %d classes, from %s", split, len(dataset), num_classes, root)
    return dataset, num_classes


# -----------------------------------------------------------------------------
# Loaders
# -----------------------------------------------------------------------------
@dataclass
class DataBundle:
    """What ``build_loader`` returns; fields read as attributes or as ``bundle["name"]``.

    Batches of ``loader_train`` / ``loader_val`` are ``(images, targets)``: images float (B, 3,
    IMG_SIZE, IMG_SIZE), or under DATA.PIPELINE fast a ``Uint8Batch`` whose ``to(device)`` gives
    that tensor (SimMIM: ``(images, masks)``), targets int64 (B,). An unreadable file is marked in its dataset's
    ``replacements`` log (the loops count and name them after each pass); in training its row holds
    the next readable sample, in validation a placeholder with target -1 that ``engine.evaluate``
    leaves out. ``mixup_fn`` is None when Mixup/CutMix are off.

    SimMIM pre-training (``TRAIN.PRETRAIN simmim``): images are ``(images, masks)`` pairs (see
    ``data/simmim.py``), targets are all 0, ``num_classes`` is 0, and the validation set and
    loader are None when the data folder has no ``val/``.
    """

    dataset_train: RobustImageDataset
    dataset_val: RobustImageDataset | None
    loader_train: DataLoader
    loader_val: DataLoader | None
    sampler_train: ResumableSampler
    sampler_val: ExactEvalSampler
    mixup_fn: Mixup | None
    num_classes: int
    class_names: list[str]

    def __getitem__(self, key: str) -> Any:
        # Dict-style access for callers written against the official dict/tuple returns.
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]


def _mixup_active(config: CfgNode) -> bool:
    aug = config.AUG
    return aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None


def _check_mixup(config: CfgNode) -> None:
    """Refuse Mixup settings timm would only reject with an assert, before any data is read."""
    if not _mixup_active(config):
        return
    aug = config.AUG
    if aug.MIXUP_MODE not in MIXUP_MODES:
        raise UserError(f"AUG.MIXUP_MODE is {aug.MIXUP_MODE!r}; use one of {', '.join(MIXUP_MODES)}")
    if config.DATA.BATCH_SIZE % 2:
        # timm's Mixup flips the batch to pair samples and asserts an even batch in every mode.
        raise UserError(
            f"DATA.BATCH_SIZE is {config.DATA.BATCH_SIZE} but Mixup/CutMix need an even batch; "
            f"use an even --batch-size or set AUG.MIXUP 0.0 and AUG.CUTMIX 0.0"
        )
    minmax = aug.CUTMIX_MINMAX
    if minmax is not None and (not isinstance(minmax, (list, tuple)) or len(minmax) != 2):
        raise UserError(f"AUG.CUTMIX_MINMAX is {minmax!r}; use null or a pair such as [0.2, 0.8]")


def _build_mixup(config: CfgNode, num_classes: int) -> Mixup | None:
    _check_mixup(config)
    if not _mixup_active(config):
        return None
    aug = config.AUG
    return Mixup(
        mixup_alpha=aug.MIXUP,
        cutmix_alpha=aug.CUTMIX,
        cutmix_minmax=aug.CUTMIX_MINMAX,
        prob=aug.MIXUP_PROB,
        switch_prob=aug.MIXUP_SWITCH_PROB,
        mode=aug.MIXUP_MODE,
        label_smoothing=config.MODEL.LABEL_SMOOTHING,
        num_classes=num_classes,
    )


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_workers(requested: int, local_processes: int, cpus: int | None = None) -> int:
    """``requested`` loader workers per process, capped at this machine's share of CPU cores.

    The release's default (8 per GPU) on a 2-core machine starts 8 processes that compete for 2
    cores, and PyTorch warns; each process gets at most ``cpus // local_processes`` (at least 1
    when any were asked for). The cap is logged once.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cpus // max(1, local_processes))
    if requested > share:
        logger.info(
            "DATA.NUM_WORKERS %d capped to %d per process: %d CPU cores for %d process(es) on this machine",
            requested,
            share,
            cpus,
            local_processes,
        )
        return share
    return requested


def _init_worker(worker_id: int, retain_memory: bool) -> None:
    """Each loader worker's set-up: stop signals left to the main process (a group-wide SIGTERM
    must not kill the workers under a trainer that is finishing its step to save), and
    ``RETAIN_FREED_MEMORY``."""
    ignore_stop_signals()
    if retain_memory:
        retain_freed_memory_in_worker(worker_id)


def build_loader(
    config: CfgNode,
    world_size: int,
    rank: int,
    *,
    train_start_index: int = 0,
    pin_memory: bool = False,
) -> DataBundle:
    """Datasets, samplers and loaders of one process (rank ``rank`` of ``world_size``).

    Training batches come from a ``ResumableSampler`` (shuffled with seed ``config.SEED``, the
    same on every rank) with ``drop_last=True``; ``train_start_index`` skips that many samples
    of this rank's order in the first epoch iterated (``batches_done * DATA.BATCH_SIZE`` to
    resume mid-epoch at the next batch). Validation uses an ``ExactEvalSampler``: every image
    once across all ranks. Training samples are ``(index, seed)`` keys, so augmentation is
    seeded per sample (see ``data/sample_seeds.py``). ``pin_memory`` is the caller's "the
    model runs on CUDA"; pinning also needs DATA.PIN_MEMORY. The config is only read.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    batch_size = int(config.DATA.BATCH_SIZE)
    if batch_size < 1:
        raise UserError(f"DATA.BATCH_SIZE is {batch_size}; use a positive --batch-size")
    num_workers = int(config.DATA.NUM_WORKERS)
    if num_workers < 0:
        raise UserError(f"DATA.NUM_WORKERS is {num_workers}; use 0 (load in the main process) or more")
    num_workers = loader_workers(num_workers, local_world_size())
    pretraining = is_pretraining(config)
    if not pretraining:
        _check_mixup(config)

    if pretraining and config.DATA.FORMAT == "shards":
        raise UserError("SimMIM pre-training reads class folders or --zip, not DATA.FORMAT shards yet")
    if pretraining and config.DATA.ZIP_MODE:
        # The release's zip layout; its labels are read and ignored.
        _check_data_path(config.DATA.DATA_PATH)
        zips = {
            is_train: build_zip_dataset(
                config.DATA.DATA_PATH,
                is_train,
                SimMIMTransform(config, is_train),
                str(config.DATA.CACHE_MODE),
                rank=rank,
                world_size=world_size,
            )[0]
            for is_train in (True, False)
        }
        dataset_train = RobustImageDataset(zips[True], strict=bool(config.DATA.STRICT), substitute=True)
        dataset_val = RobustImageDataset(zips[False], strict=bool(config.DATA.STRICT), substitute=False)
        num_classes = 0
    elif pretraining:
        train_dir, val_dir = pretraining_folders(config.DATA.DATA_PATH)
        dataset_train = build_pretraining_dataset(config, train_dir, is_train=True)
        dataset_val = build_pretraining_dataset(config, val_dir, is_train=False) if val_dir else None
        num_classes = 0
    else:
        dataset_train, num_classes = build_dataset(True, config)
        dataset_val, _ = build_dataset(False, config)

    # Seeded per sample: augmentation is the same with any worker count and after a mid-epoch resume.
    if config.DATA.FORMAT == "shards" and not pretraining:
        # Shards in a per-epoch order, split across ranks by position, then a shuffle buffer.
        sampler_train = build_shard_sampler(config, dataset_train, world_size, rank)
    else:
        n_train = len(dataset_train)
        seed = int(config.SEED)
        sampler_train = ResumableSampler(
            n_train, world_size, rank, shuffle=True, seed=seed, drop_last=False, sample_seeds=True
        )
    if sampler_train.num_samples < batch_size:
        raise UserError(
            f"DATA.BATCH_SIZE {batch_size} is larger than the {sampler_train.num_samples} training images per "
            f"process ({len(dataset_train)} images, {world_size} processes), so training would yield no batch; "
            f"use a smaller --batch-size"
        )
    if train_start_index:
        sampler_train.set_start_index(train_start_index)
    # SimMIM's validation masks are random but the same in every evaluation.
    val_seeds = int(config.SEED) if pretraining else None
    sampler_val = ExactEvalSampler(len(dataset_val or ()), world_size, rank, sample_seeds_from=val_seeds)

    pin = bool(config.DATA.PIN_MEMORY) and pin_memory
    common: dict[str, Any] = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
    )
    if num_workers > 0:
        common["worker_init_fn"] = functools.partial(_init_worker, retain_memory=bool(config.RETAIN_FREED_MEMORY))
    elif config.RETAIN_FREED_MEMORY:
        retain_freed_memory()
    # The workers' own RNG seeds come from the config; augmentation itself is seeded per sample.
    loader_train = DataLoader(
        dataset_train,
        sampler=sampler_train,
        drop_last=True,
        generator=torch.Generator().manual_seed(int(config.SEED) + rank),
        collate_fn=collate_samples,  # the fast pipeline's uint8 samples are normalised per batch on the device
        **common,
    )
    loader_val = (
        DataLoader(
            dataset_val, sampler=sampler_val, shuffle=False, drop_last=False, collate_fn=collate_samples, **common
        )
        if dataset_val is not None
        else None
    )

    mixup_fn = None if pretraining else _build_mixup(config, num_classes)
    logger.info(
        "rank %d/%d: %d train batches of %d per epoch, %d val images on this rank, mixup %s, pin_memory %s",
        rank,
        world_size,
        len(loader_train),
        batch_size,
        len(sampler_val),
        "on" if mixup_fn is not None else "off",
        pin,
    )
    return DataBundle(
        dataset_train=dataset_train,
        dataset_val=dataset_val,
        loader_train=loader_train,
        loader_val=loader_val,
        sampler_train=sampler_train,
        sampler_val=sampler_val,
        mixup_fn=mixup_fn,
        num_classes=num_classes,
        class_names=[] if pretraining else list(dataset_train.classes),
    )
