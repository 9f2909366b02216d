"""Optimizer construction and learning-rate scaling, as in the official Swin release.

Weight decay is applied to matrices (Linear/conv weights) only: 1-D parameters (norm weights,
biases) and the position tables (``relative_position_bias_table``, ``absolute_pos_embed``) are
not decayed, since shrinking them toward zero only hurts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from errors import UserError

logger = logging.getLogger("swin.optimizer")

# Always excluded from weight decay, whatever the model reports.
NO_DECAY_KEYWORDS = ("relative_position_bias_table", "absolute_pos_embed")
_IMPLS = ("auto", "fused", "foreach", "single")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers.

    Parameter names then match what ``no_weight_decay()`` reports (no 'module.' prefixes).
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _names_from(model: nn.Module, method: str) -> set[str]:
    fn = getattr(model, method, None)
    return set(fn()) if callable(fn) else set()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed and a non-decayed group (empty groups dropped).

    No decay for: 1-D tensors, names ending in '.bias', names in ``model.no_weight_decay()``,
    names containing a keyword from ``model.no_weight_decay_keywords()`` or NO_DECAY_KEYWORDS.
    Each group carries a 'name' ('decay' / 'no_decay') for logging.
    """
    model = _unwrap(model)
    skip = _names_from(model, "no_weight_decay")
    keywords = tuple(_names_from(model, "no_weight_decay_keywords")) + NO_DECAY_KEYWORDS
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen parameters must not be stepped (weight decay would still move them)
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _impl_kwargs(impl: str, params: Iterable[torch.Tensor]) -> dict[str, bool]:
    key = str(impl).strip().lower()
    if key not in _IMPLS:
        raise UserError(f"TRAIN.OPTIMIZER.IMPL must be one of {', '.join(_IMPLS)}, not {impl!r}")
    if key == "auto":
        # Fused kernels are fastest on CUDA; foreach (multi-tensor) is the fast portable path.
        on_cuda = all(p.device.type == "cuda" for p in params)
        return {"fused": True} if on_cuda else {"foreach": True}
    if key == "fused":
        return {"fused": True}
    if key == "foreach":
        return {"foreach": True}
    return {"foreach": False, "fused": False}


def build_optimizer(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD (per TRAIN.OPTIMIZER.NAME) over :func:`param_groups` with lr=TRAIN.BASE_LR.

    The scheduler (lr_scheduler.build_scheduler) sets the real, scaled learning rate. Unknown
    names or implementations raise UserError. Build it after moving the model to its device
    (the 'auto' implementation looks at where the parameters are).
    """
    opt_cfg = config.TRAIN.OPTIMIZER
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY)
    if not groups:
        raise UserError("the model has no trainable parameters; nothing to optimize")
    if float(getattr(config.TRAIN, "LAYER_DECAY", 1.0)) != 1.0:
        logger.warning("TRAIN.LAYER_DECAY=%s is not supported and is ignored (1.0 = off)", config.TRAIN.LAYER_DECAY)
    name = str(opt_cfg.NAME).strip().lower()
    if name not in ("adamw", "sgd"):
        raise UserError(f"unknown optimizer {opt_cfg.NAME!r} in TRAIN.OPTIMIZER.NAME; use 'adamw' or 'sgd'")
    impl = _impl_kwargs(opt_cfg.IMPL, [p for g in groups for p in g["params"]])
    lr = float(config.TRAIN.BASE_LR)
    try:
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=lr, eps=float(opt_cfg.EPS), betas=tuple(opt_cfg.BETAS), **impl)
        return torch.optim.SGD(groups, lr=lr, momentum=float(opt_cfg.MOMENTUM), nesterov=True, **impl)
    except RuntimeError as e:
        # e.g. 'fused' asked for on a device or dtype without fused kernels
        reason = (str(e).splitlines() or ["error"])[0]
        raise UserError(f"TRAIN.OPTIMIZER.IMPL {opt_cfg.IMPL!r} does not work here ({reason}); use 'auto'") from None


# Per-group flags that choose torch's implementation, not the optimisation itself.
_IMPL_FLAGS = ("foreach", "fused", "capturable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's implementation flags.

    A saved state brings back the flags of the run that wrote it: a checkpoint written on the CPU
    (foreach) would turn a fused CUDA AdamW into foreach, and the fp16 scaler's step then fails;
    the reverse asks for fused kernels the CPU may lack. Moments, steps and lrs come from
    ``state``; the flags are re-applied from the optimizer as built here.
    """
    flags = {k: optimizer.defaults[k] for k in _IMPL_FLAGS if k in optimizer.defaults}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(flags)


def scaled_lrs(config: Any, world_size: int) -> tuple[float, float, float]:
    """(base_lr, warmup_lr, min_lr) scaled linearly with the total batch, as the official release.

    The config values are per 512 images: each is multiplied by
    DATA.BATCH_SIZE * world_size / 512, and by TRAIN.ACCUMULATION_STEPS when that is > 1
    (the effective batch grows by that factor).
    """
    factor = config.DATA.BATCH_SIZE * world_size / 512.0
    if config.TRAIN.ACCUMULATION_STEPS > 1:
        factor *= config.TRAIN.ACCUMULATION_STEPS
    return (
        float(config.TRAIN.BASE_LR) * factor,
        float(config.TRAIN.WARMUP_LR) * factor,
        float(config.TRAIN.MIN_LR) * factor,
    )
