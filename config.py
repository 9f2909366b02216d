"""Configuration: every default once, YAML files override, ``--opts`` overrides last.

Key names follow the official Swin Transformer release so its YAML files load unchanged.
``get_config(cfg_file, opts)`` is the public entry point; ``config_from_args(args)`` applies
the command-line flags of ``main.py`` on top.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from errors import UserError

_C = CN()

# YAML files named here are merged first, in order (paths relative to the including file).
_C.BASE = [""]

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size for a single GPU or process; the total batch is this times world size.
_C.DATA.BATCH_SIZE = 128
# Root of the dataset: ImageFolder ``train/`` and ``val/`` below it.
_C.DATA.DATA_PATH = ""
# Dataset kind: 'imagenet' (any ImageFolder) or 'imagenet22K' (21,841 classes).
_C.DATA.DATASET = "imagenet"
# Input image size (square).
_C.DATA.IMG_SIZE = 224
# Interpolation for resizing: 'random', 'bilinear' or 'bicubic'.
_C.DATA.INTERPOLATION = "bicubic"
# Read the zip layout instead of folders: DATA_PATH/{train,val}.zip with {train,val}_map.txt
# ('relative/path<TAB>label' per line); ImageNet-1K style only (data/zip_dataset.py).
_C.DATA.ZIP_MODE = False
# What each rank keeps of the zip in RAM: 'no' nothing, 'full' every image, 'part' the indices
# i % world_size == rank. Sampling stays the global shuffle in every mode; val caches 'part' unless 'no'.
_C.DATA.CACHE_MODE = "part"
# On-disk layout: 'folder' (ImageFolder train/ and val/), 'zip' (the same as ZIP_MODE True) or
# 'shards' (WebDataset-style tar shards, data/shards.py; README "Sharded tar datasets").
_C.DATA.FORMAT = "folder"
# Training shards for FORMAT shards: a brace pattern (/d/train-{000000..000146}.tar), a glob, a
# folder of .tar files or one .tar; "" means the folder DATA_PATH/train.
_C.DATA.SHARDS_TRAIN = ""
# Validation shards, given as SHARDS_TRAIN is; "" means the folder DATA_PATH/val.
_C.DATA.SHARDS_VAL = ""
# Shards: samples in the training shuffle buffer of each rank (0 or 1: shard order, no buffer).
_C.DATA.SHUFFLE_BUFFER = 2000
# Shards: training samples per epoch over all ranks (0: every sample of the shard index once);
# each rank takes ceil(EPOCH_SAMPLES / world size), so every rank runs the same number of steps.
_C.DATA.EPOCH_SAMPLES = 0
# Pin CPU memory in the DataLoader for faster host-to-device copies.
_C.DATA.PIN_MEMORY = True
# DataLoader worker processes per rank.
_C.DATA.NUM_WORKERS = 8
# SimMIM: side in pixels of the square patches masked together (a multiple of the model patch).
_C.DATA.MASK_PATCH_SIZE = 32
# SimMIM: fraction of mask patches masked in each image (rounded up).
_C.DATA.MASK_RATIO = 0.6
# Fail on the first unreadable image instead of substituting another sample (the fast pipeline then
# decodes every JPEG whole, so damage below a crop is seen too).
_C.DATA.STRICT = False
# Training input pipeline: 'fast' (data/fast_transforms.py: the same crop boxes, flips, RandAugment
# ops and erasing for a given seed; only the crop's part of a JPEG decoded, the same pixels; crops
# resized by torch's uint8 kernel, within 2 grey levels of Pillow's; a JPEG crop box at least
# 1.25 x 2, 4 or 8 times the output is decoded at 1/2, 1/4 or 1/8 size, about 1 grey level from
# the full decode; everything else bit-identical; the validation transform gives the same bytes,
# computing only the centre crop of its resize) or 'reference' (timm's released transforms as they
# are). README "A faster input pipeline".
_C.DATA.PIPELINE = "fast"

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Model family: 'swin' (V1, reads MODEL.SWIN) or 'swinv2' (V2, reads MODEL.SWINV2).
_C.MODEL.TYPE = "swin"
# Model name; names the output folder OUTPUT/NAME/TAG.
_C.MODEL.NAME = "swin_tiny_patch4_window7_224"
# Checkpoint to fine-tune from (weights only; see --pretrained).
_C.MODEL.PRETRAINED = ""
# Checkpoint to resume training from (weights, optimizer, scheduler, epoch).
_C.MODEL.RESUME = ""
# Number of classes; overwritten by the number of class folders of the dataset.
_C.MODEL.NUM_CLASSES = 1000
# Dropout rate on MLP and projection outputs.
_C.MODEL.DROP_RATE = 0.0
# Stochastic depth rate at the last block; rises linearly from 0 over all blocks.
_C.MODEL.DROP_PATH_RATE = 0.1
# Label smoothing, used when Mixup/CutMix are off.
_C.MODEL.LABEL_SMOOTHING = 0.1

# SimMIM pre-training (official keys; read with TRAIN.PRETRAIN simmim)
_C.MODEL.SIMMIM = CN()
_C.MODEL.SIMMIM.NORM_TARGET = CN()
# Predict each pixel normalised by the mean and std of its neighbourhood instead of raw pixels.
_C.MODEL.SIMMIM.NORM_TARGET.ENABLE = False
# Side of that neighbourhood (odd).
_C.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 47

# Swin Transformer parameters
_C.MODEL.SWIN = CN()
# Side of the square patch embedded as one token.
_C.MODEL.SWIN.PATCH_SIZE = 4
# Input image channels.
_C.MODEL.SWIN.IN_CHANS = 3
# Channels C of the first stage; stage i has C * 2**i.
_C.MODEL.SWIN.EMBED_DIM = 96
# Number of blocks per stage.
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
# Number of attention heads per stage.
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
# Window size M (tokens per side).
_C.MODEL.SWIN.WINDOW_SIZE = 7
# MLP hidden size as a multiple of the channels.
_C.MODEL.SWIN.MLP_RATIO = 4.0
# Learn a bias on the query, key and value projections.
_C.MODEL.SWIN.QKV_BIAS = True
# Attention scale; None means head_dim ** -0.5.
_C.MODEL.SWIN.QK_SCALE = None
# Add a learned absolute position embedding after patch embedding (Table 4 ablation).
_C.MODEL.SWIN.APE = False
# LayerNorm after patch embedding.
_C.MODEL.SWIN.PATCH_NORM = True
# Shift every second block's windows by M // 2 (Table 4 ablation: False = no shifting).
_C.MODEL.SWIN.SHIFT = True
# Add the relative position bias B to attention logits (Table 4 ablation).
_C.MODEL.SWIN.RPB = True
# Attention implementation: 'auto' (sdpa on CUDA and for fp32 CPU inference, the reference math for
# CPU training and for V1's bf16/fp16 CPU inference: the fastest measured on each), 'sdpa'
# (scaled_dot_product_attention) or 'reference' (Eq. 4 spelled out). All three give the same
# outputs (fp32, within 1e-5).
_C.MODEL.SWIN.ATTN_IMPL = "auto"

# Swin Transformer V2 parameters (read when MODEL.TYPE is 'swinv2'; the release's key names)
_C.MODEL.SWINV2 = CN()
# Side of the square patch embedded as one token.
_C.MODEL.SWINV2.PATCH_SIZE = 4
# Input image channels.
_C.MODEL.SWINV2.IN_CHANS = 3
# Channels C of the first stage; stage i has C * 2**i.
_C.MODEL.SWINV2.EMBED_DIM = 96
# Number of blocks per stage.
_C.MODEL.SWINV2.DEPTHS = [2, 2, 6, 2]
# Number of attention heads per stage.
_C.MODEL.SWINV2.NUM_HEADS = [3, 6, 12, 24]
# Window size M (tokens per side); a stage smaller than M uses its whole map, unshifted.
_C.MODEL.SWINV2.WINDOW_SIZE = 7
# MLP hidden size as a multiple of the channels.
_C.MODEL.SWINV2.MLP_RATIO = 4.0
# Learn biases on the query and value projections (the key has none in V2).
_C.MODEL.SWINV2.QKV_BIAS = True
# Add a learned absolute position embedding after patch embedding.
_C.MODEL.SWINV2.APE = False
# LayerNorm after patch embedding.
_C.MODEL.SWINV2.PATCH_NORM = True
# Per stage, the window the loaded weights were trained with (0 = this model's own window): it
# scales the inputs of the position-bias MLP. For weights from a 192² window-12 pre-training
# fine-tuned at any window, [12, 12, 12, 6] (stage 4 of a 192² model is 6x6, so its window was 6).
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]
# Attention implementation, as MODEL.SWIN.ATTN_IMPL: 'auto', 'sdpa' or 'reference' (cosine
# logits in fp32, but for bf16 inference).
_C.MODEL.SWINV2.ATTN_IMPL = "auto"

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
# First epoch to run (set by resuming).
_C.TRAIN.START_EPOCH = 0
# Total training epochs.
_C.TRAIN.EPOCHS = 300
# Linear warmup epochs.
_C.TRAIN.WARMUP_EPOCHS = 20
# AdamW weight decay (not applied to norms, biases and position tables).
_C.TRAIN.WEIGHT_DECAY = 0.05
# Learning rate per 512 images of total batch; scaled linearly.
_C.TRAIN.BASE_LR = 5e-4
# Learning rate at the start of warmup, per 512 images.
_C.TRAIN.WARMUP_LR = 5e-7
# Learning rate at the end of the schedule, per 512 images.
_C.TRAIN.MIN_LR = 5e-6
# Clip gradients to this global L2 norm; 0 or None disables clipping (the norm is still logged).
_C.TRAIN.CLIP_GRAD = 5.0
# Resume from the newest loadable checkpoint in the output folder.
_C.TRAIN.AUTO_RESUME = True
# Optimizer step every N batches; the effective batch is N times larger.
_C.TRAIN.ACCUMULATION_STEPS = 1
# Gradient checkpointing in every block: less memory, more compute.
_C.TRAIN.USE_CHECKPOINT = False
# Compile the model with torch.compile.
_C.TRAIN.COMPILE = False
# What TRAIN.COMPILE compiles: 'blocks' (each Swin block on its own, regional: distinct block
# shapes are traced once, so it compiles in a fraction of the time) or 'model' (one graph).
_C.TRAIN.COMPILE_SCOPE = "blocks"
# torch.compile backend: 'inductor' (generated kernels, the fast one); 'aot_eager' and 'eager'
# trace without generating code (quick to compile; for checking a model compiles).
_C.TRAIN.COMPILE_BACKEND = "inductor"
# Write a resumable checkpoint every N optimizer steps (0 = only at epoch ends).
_C.TRAIN.STEP_SAVE_FREQ = 0
# Shard parameters, gradients and optimizer state over the ranks (FSDP2, one unit per Swin block)
# instead of replicating them (DDP); checkpoints become sharded folders (see fsdp.py).
_C.TRAIN.FSDP = False
# FSDP: free each block's gathered weights after its forward and gather them again for backward
# (less memory, one more all-gather per block); False keeps them until backward.
_C.TRAIN.FSDP_RESHARD_AFTER_FORWARD = True
# Several ranks: poll for a stop signal (SIGTERM/SIGINT, then save and exit) every N optimizer
# steps; each poll is an all-reduce read back on the host, which stalls a GPU. One process polls
# its own flag every step at no cost. A stop comes at most N - 1 steps after the signal.
_C.TRAIN.STOP_POLL_FREQ = 10
# Stop after this many non-finite losses in a row (fp32/bf16; fp16 is handled by the scaler).
_C.TRAIN.MAX_NONFINITE_STEPS = 20
# Layer-wise lr decay (official key; 1.0 = off): lr x LAYER_DECAY^(sum(depths) + 1 - layer id); see README.
_C.TRAIN.LAYER_DECAY = 1.0
# Self-supervised pre-training instead of classification: '' (off) or 'simmim' (--pretrain simmim).
_C.TRAIN.PRETRAIN = ""

# LR scheduler
_C.TRAIN.LR_SCHEDULER = CN()
# 'cosine', 'linear' or 'step'; updated every optimizer step.
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"
# Epochs between decays for 'step'.
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# Decay factor for 'step'.
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
# 'cosine' and 'linear': the decay starts after warmup (True) rather than counting warmup in.
# 'step' and 'multistep' count their epochs from the start, warmup included, as the release does.
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
# Multi-step gamma (official key).
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
# Multi-step milestones in epochs (official key).
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []

# Optimizer
_C.TRAIN.OPTIMIZER = CN()
# 'adamw' or 'sgd'.
_C.TRAIN.OPTIMIZER.NAME = "adamw"
# Optimizer epsilon.
_C.TRAIN.OPTIMIZER.EPS = 1e-8
# Adam betas.
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
# SGD momentum.
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
# torch's optimizer implementation: 'auto' (fused on CUDA and the CPU, foreach elsewhere), 'fused', 'foreach', 'single'.
_C.TRAIN.OPTIMIZER.IMPL = "auto"

# -----------------------------------------------------------------------------
# Augmentation
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Color jitter factor (used when AUTO_AUGMENT is off).
_C.AUG.COLOR_JITTER = 0.4
# timm auto-augment policy; 'none' disables.
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
# Random erasing probability.
_C.AUG.REPROB = 0.25
# Random erasing mode.
_C.AUG.REMODE = "pixel"
# Random erasing count.
_C.AUG.RECOUNT = 1
# Mixup alpha; 0 disables.
_C.AUG.MIXUP = 0.8
# CutMix alpha; 0 disables.
_C.AUG.CUTMIX = 1.0
# CutMix min/max ratio; overrides alpha when set.
_C.AUG.CUTMIX_MINMAX = None
# Probability of applying Mixup or CutMix to a batch.
_C.AUG.MIXUP_PROB = 1.0
# Probability of CutMix instead of Mixup when both are on.
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# How Mixup params apply: 'batch', 'pair' or 'elem'.
_C.AUG.MIXUP_MODE = "batch"

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Resize to 256/224 of the size and center crop (True) or resize straight to the size (False).
_C.TEST.CROP = True
# Sequential (non-distributed) sampler for validation (official key; evaluation is always exact).
_C.TEST.SEQUENTIAL = False
# Shuffle validation data (official key).
_C.TEST.SHUFFLE = False

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Legacy apex switch of the official release (accepted, AMP_ENABLE decides).
_C.ENABLE_AMP = False
# Mixed precision (see AMP_DTYPE for which half type).
_C.AMP_ENABLE = True
# Legacy apex opt level (accepted for compatibility, unused).
_C.AMP_OPT_LEVEL = ""
# Autocast dtype: 'auto' (bf16 on GPUs that support it, else fp16 with the loss scaler; bf16 on
# CPUs with native bf16, else fp32), 'bfloat16' or 'float16'.
_C.AMP_DTYPE = "auto"
# Output root; the run writes to OUTPUT/MODEL.NAME/TAG.
_C.OUTPUT = "output"
# Tag of the run.
_C.TAG = "default"
# Save a checkpoint every N epochs (and always after the last).
_C.SAVE_FREQ = 1
# Keep this many most recent epoch checkpoints (plus best and last); 0 keeps all.
_C.SAVE_KEEP = 3
# Log every N steps.
_C.PRINT_FREQ = 10
# Random seed (each rank adds its rank).
_C.SEED = 0
# Keep freed memory instead of returning it to the OS (glibc mallopt; allocator.py) in the processes
# that transform images: the data loader's workers, and the main process when DATA.NUM_WORKERS is 0;
# and, on the CPU, the whole process of training, --eval, --throughput and predict.py (large blocks
# too: no page faults for each step's activations and gradients).
_C.RETAIN_FREED_MEMORY = True
# Only evaluate and exit.
_C.EVAL_MODE = False
# Only measure throughput and exit.
_C.THROUGHPUT_MODE = False
# Local rank (set from the environment by torchrun; kept for old launch scripts).
_C.LOCAL_RANK = 0
# Fused window shift + partition kernel (kernels/).
_C.FUSED_WINDOW_PROCESS = False
# Fused LayerNorm (accepted for compatibility; torch's layer norm is used).
_C.FUSED_LAYERNORM = False
# float32 matrix products on CUDA: 'high' (TF32 tensor cores on Ampere and newer), 'highest'
# (full fp32, PyTorch's default) or 'medium'. Has no effect on the CPU.
_C.CUDA_MATMUL_PRECISION = "high"
# Device: 'auto' (CUDA when available), 'cpu' or 'cuda'.
_C.DEVICE = "auto"
# Show tracebacks for user errors.
_C.DEBUG = False


def _closest_key(cfg: CN, full_key: str) -> str:
    """The valid key nearest in spelling to ``full_key`` (for error messages)."""
    candidates = list(_flat_keys(cfg))
    matches = difflib.get_close_matches(full_key, candidates, n=1, cutoff=0.0)
    return matches[0] if matches else ""


def _flat_keys(node: CN, prefix: str = "") -> Iterable[str]:
    for k, v in node.items():
        name = f"{prefix}{k}"
        if isinstance(v, CN):
            yield from _flat_keys(v, name + ".")
        else:
            yield name


def _check_keys(cfg: CN, data: dict, source: str, prefix: str = "") -> None:
    """Reject unknown keys with the closest valid one, before yacs sees them."""
    for k, v in data.items():
        full = f"{prefix}{k}"
        node = cfg
        for part in full.split(".")[:-1]:
            node = node[part]
        if k not in node:
            raise UserError(f"unknown config key {full} in {source}; did you mean {_closest_key(_C, full)}?")
        if isinstance(v, dict) and isinstance(node[k], CN):
            _check_keys(cfg, v, source, full + ".")
        elif _is_int_for_float(node[k], v):
            data[k] = float(v)


def _is_int_for_float(original: Any, value: Any) -> bool:
    """YAML writes 0 where a float key means 0.0; yacs alone would refuse it."""
    return isinstance(original, float) and isinstance(value, int) and not isinstance(value, bool)


def _as_string(value: str) -> str:
    """A string for a key whose default is a string: its Python literal if it is one (``"'a'"``
    as yacs reads it), else the text as it is, a number included."""
    try:
        decoded = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return decoded if isinstance(decoded, str) else value


def _merge_mapping(config: CN, data: dict) -> None:
    """``config.merge_from_other_cfg(CN(data))``, except that a string for a key whose default is
    a string is taken as text: yacs would read ``TAG: '2024'`` (as a run's own config.yaml
    stores a numeric tag) as the number 2024 and refuse it as the wrong type."""

    def split(node: CN, d: dict, path: tuple) -> dict:
        rest = {}
        for k, v in d.items():
            default = node[k] if k in node else None
            if isinstance(v, dict) and isinstance(default, CN):
                rest[k] = split(default, v, (*path, k))
            elif isinstance(v, str) and isinstance(default, str):
                strings.append(((*path, k), _as_string(v)))
            else:
                rest[k] = v
        return rest

    strings: list[tuple[tuple, str]] = []
    config.merge_from_other_cfg(CN(split(config, data, ())))
    for path, value in strings:
        node = config
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value


def _merge_yaml(config: CN, cfg_file: str) -> None:
    if not os.path.isfile(cfg_file):
        raise UserError(f"config file {cfg_file} does not exist; pass an existing YAML file to --cfg")
    with open(cfg_file) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {cfg_file} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {cfg_file} must hold a mapping of keys, not {type(data).__name__}")
    if isinstance(data.get("BASE"), str):  # `BASE: a.yaml` as well as a list of them
        data = {**data, "BASE": [data["BASE"]]}
    for base in data.get("BASE") or [""]:
        if base:
            _merge_yaml(config, os.path.join(os.path.dirname(cfg_file), base))
    _check_keys(config, data, cfg_file)
    config.defrost()
    try:
        _merge_mapping(config, data)
    except ValueError as e:
        raise UserError(f"wrong value type in {cfg_file}: {e}") from e
    config.BASE = [""]


def _merge_opts(config: CN, opts: Sequence[str]) -> None:
    if len(opts) % 2:
        raise UserError(f"--opts takes KEY VALUE pairs; got an odd number of items: {' '.join(opts)}")
    for key, value in zip(opts[0::2], opts[1::2], strict=True):
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], CN):
                raise UserError(f"unknown config key {key} in --opts; did you mean {_closest_key(_C, key)}?")
            node = node[part]
        if parts[-1] not in node:
            raise UserError(f"unknown config key {key} in --opts; did you mean {_closest_key(_C, key)}?")
        try:
            decoded = ast.literal_eval(value) if isinstance(value, str) else value
        except (ValueError, SyntaxError):
            decoded = value
        if _is_int_for_float(node[parts[-1]], decoded):
            value = str(float(decoded))
        if isinstance(node[parts[-1]], str) and isinstance(value, str):
            node[parts[-1]] = _as_string(value)  # TAG 2024 is the text '2024', as for the yaml files
            continue
        try:
            config.merge_from_list([key, value])
        except (ValueError, AssertionError) as e:
            raise UserError(f"wrong value type for {key} in --opts: {e}") from e


def _coerce_types(config: CN) -> None:
    """Values yacs cannot type-check (None defaults) that must still be sane."""
    if isinstance(config.MODEL.SWIN.QK_SCALE, str):
        raise UserError(f"MODEL.SWIN.QK_SCALE must be a number or null, not {config.MODEL.SWIN.QK_SCALE!r}")
    if config.AUG.CUTMIX_MINMAX is not None and isinstance(config.AUG.CUTMIX_MINMAX, str):
        config.AUG.CUTMIX_MINMAX = ast.literal_eval(config.AUG.CUTMIX_MINMAX)
    _reconcile_data_format(config)


DATA_FORMATS = ("folder", "zip", "shards")


def _reconcile_data_format(config: CN) -> None:
    """Make DATA.FORMAT and DATA.ZIP_MODE (--zip) say the same thing: 'zip' sets ZIP_MODE and
    ZIP_MODE makes the format 'zip', so code reading either key sees the zip layout."""
    fmt = str(config.DATA.FORMAT).strip().lower()
    if fmt not in DATA_FORMATS:
        raise UserError(f"DATA.FORMAT is {config.DATA.FORMAT!r}; use one of {', '.join(DATA_FORMATS)}")
    if config.DATA.ZIP_MODE and fmt == "shards":
        raise UserError("--zip (DATA.ZIP_MODE) and DATA.FORMAT shards name two layouts; keep one of them")
    if fmt == "zip":
        config.DATA.ZIP_MODE = True
    elif config.DATA.ZIP_MODE:
        fmt = "zip"
    config.DATA.FORMAT = fmt


# MODEL.TYPE -> the section of MODEL that describes the architecture.
MODEL_SECTIONS = {"swin": "SWIN", "swinv2": "SWINV2"}


def model_section(config: CN) -> CN:
    """The architecture section that ``MODEL.TYPE`` reads (``MODEL.SWIN`` or ``MODEL.SWINV2``)."""
    name = MODEL_SECTIONS.get(config.MODEL.TYPE)
    if name is None:
        raise UserError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; use one of {', '.join(map(repr, MODEL_SECTIONS))}")
    return config.MODEL[name]


PRETRAIN_MODES = ("", "simmim")


def is_pretraining(config: CN) -> bool:
    """True for SimMIM pre-training (``TRAIN.PRETRAIN simmim``); an unknown mode is a ``UserError``."""
    mode = str(config.TRAIN.PRETRAIN).strip().lower()
    if mode not in PRETRAIN_MODES:
        raise UserError(f"TRAIN.PRETRAIN is {config.TRAIN.PRETRAIN!r}; use 'simmim' or '' (supervised training)")
    return mode == "simmim"


def check_model_section(config: CN) -> None:
    """Refuse architecture keys set in the section that ``MODEL.TYPE`` does not read.

    A V2 config that sets ``MODEL.SWIN.WINDOW_SIZE`` would otherwise build a model with the
    default window without a word.
    """
    read = MODEL_SECTIONS.get(config.MODEL.TYPE)
    model_section(config)  # unknown type: one line listing the known ones
    for name in MODEL_SECTIONS.values():
        if name == read:
            continue
        changed = [k for k, v in config.MODEL[name].items() if _C.MODEL[name][k] != v]
        if changed:
            raise UserError(
                f"MODEL.{name}.{changed[0]} is set, but MODEL.TYPE {config.MODEL.TYPE!r} reads MODEL.{read}; "
                f"move the {len(changed)} MODEL.{name} key(s) there or set MODEL.TYPE"
            )


def default_config() -> CN:
    """A fresh, mutable copy of every default."""
    return _C.clone()


def get_config(cfg_file: str | None = None, opts: Sequence[str] | None = None) -> CN:
    """Defaults, then ``cfg_file`` (with its BASE chain), then ``opts``; returned frozen.

    Sets ``OUTPUT`` to ``OUTPUT/MODEL.NAME/TAG`` as the official release does.
    """
    config = default_config()
    if cfg_file:
        _merge_yaml(config, cfg_file)
    config.defrost()
    if opts:
        _merge_opts(config, list(opts))
    _coerce_types(config)
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()
    return config


def config_from_args(args: argparse.Namespace) -> CN:
    """The config of ``main.py``: file, ``--opts``, then the dedicated flags."""
    config = default_config()
    if args.cfg:
        _merge_yaml(config, args.cfg)
    config.defrost()
    if args.opts:
        _merge_opts(config, list(args.opts))
    flags: dict[str, Any] = {
        "DATA.BATCH_SIZE": args.batch_size,
        "DATA.DATA_PATH": args.data_path,
        "DATA.ZIP_MODE": True if args.zip else None,
        "DATA.CACHE_MODE": args.cache_mode,
        "DATA.DATASET": getattr(args, "dataset", None),
        "MODEL.PRETRAINED": args.pretrained,
        "MODEL.RESUME": args.resume,
        "TRAIN.ACCUMULATION_STEPS": args.accumulation_steps,
        "TRAIN.USE_CHECKPOINT": True if args.use_checkpoint else None,
        "TRAIN.COMPILE": True if getattr(args, "compile", False) else None,
        "TRAIN.FSDP": True if getattr(args, "fsdp", False) else None,
        "TRAIN.OPTIMIZER.NAME": args.optim,
        "TRAIN.PRETRAIN": getattr(args, "pretrain", None),
        # The release's deprecated apex levels: O0 meant no mixed precision; O1/O2 change nothing.
        "AMP_ENABLE": False if args.disable_amp or getattr(args, "amp_opt_level", None) == "O0" else None,
        "OUTPUT": args.output,
        "TAG": args.tag,
        "EVAL_MODE": True if args.eval else None,
        "THROUGHPUT_MODE": True if args.throughput else None,
        "FUSED_WINDOW_PROCESS": True if args.fused_window_process else None,
        "FUSED_LAYERNORM": True if args.fused_layernorm else None,
        "DEVICE": getattr(args, "device", None),
        "DEBUG": True if getattr(args, "debug", False) else None,
    }
    for key, value in flags.items():
        if value is None:
            continue
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.LOCAL_RANK = int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0) or 0))
    _coerce_types(config)
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()
    return config


def dump_config(config: CN, path: str) -> None:
    """Write the merged config as YAML (the record of a run)."""
    with open(path, "w") as f:
        f.write(config.dump())


def _head_rows(checkpoint: dict) -> int | None:
    """Output count of a checkpoint's classifier (release, timm or torchvision names), or None."""
    # The weights as the loader finds them; imported here since config.py stays free of torch.
    from models.pretrained import extract_state_dict

    state = extract_state_dict(checkpoint)
    for key in ("head.weight", "head.fc.weight"):
        value = state.get(key)
        if value is not None and getattr(value, "ndim", 0) == 2:
            return int(value.shape[0])
    return None


def config_for_checkpoint(
    checkpoint: dict, cfg_file: str | None = None, opts: Sequence[str] | None = None, source: str = "checkpoint"
) -> CN:
    """The config that rebuilds a checkpoint's model, frozen.

    ``cfg_file`` (with ``opts``) when given, else the YAML text the checkpoint carries (ours, or an
    official training checkpoint's yacs config as loaded); MODEL.NUM_CLASSES is then the
    checkpoint's classifier size (a training config file keeps the default 1,000; the trainer set
    the dataset's count). No config anywhere is a one-line ``UserError``.
    """
    if cfg_file:
        config = get_config(cfg_file, opts)
    elif isinstance(checkpoint.get("config"), str):
        config = config_from_yaml_text(checkpoint["config"], opts)
    else:
        raise UserError(f"{source} stores no config; pass --cfg with the config it was trained with")
    rows = _head_rows(checkpoint)
    if rows is None or rows == config.MODEL.NUM_CLASSES:
        return config
    config = config.clone()
    config.defrost()
    config.MODEL.NUM_CLASSES = rows
    config.freeze()
    return config


def require_classifier(config: CN, source: str) -> None:
    """UserError unless ``config`` builds a classifier: SimMIM pre-training (``TRAIN.PRETRAIN``)
    builds an encoder and a pixel decoder, with no class scores to predict, explain or export."""
    if is_pretraining(config):
        raise UserError(
            f"{source} is a SimMIM pre-training model, with no classifier; fine-tune it first "
            "(main.py --cfg CLASSIFIER.yaml --pretrained CKPT) and pass that checkpoint"
        )


def config_from_yaml_text(text: str, opts: Sequence[str] | None = None) -> CN:
    """Rebuild a config from the YAML text stored in a checkpoint, unknown keys dropped, then
    ``opts`` (KEY VALUE pairs, checked like ``--opts``) on top."""
    config = default_config()
    data = yaml.safe_load(text) or {}

    def _prune(node: CN, d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if k in node:
                out[k] = _prune(node[k], v) if isinstance(v, dict) and isinstance(node[k], CN) else v
        return out

    _merge_mapping(config, _prune(config, data))
    if opts:
        _merge_opts(config, list(opts))
    config.freeze()
    return config
