"""Optimizer construction and learning-rate scaling, as in the official Swin release.

Weight decay is applied to matrices (Linear/conv weights) only: 1-D parameters (norm weights,
biases) and the position tables (``relative_position_bias_table``, ``absolute_pos_embed``) are
not decayed, since shrinking them toward zero only hurts.

Layer-wise lr decay (TRAIN.LAYER_DECAY < 1): the groups are split further by layer, each with an
``lr_scale`` the schedulers apply (see :func:`layer_id` and :func:`param_groups`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
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


# Parameters of the patch embedding's layer (id 0), after any 'encoder.' prefix is stripped. The
# release leaves ``absolute_pos_embed`` to its last branch (id L + 1, full lr), and so does this.
_EMBED_NAMES = ("mask_token",)
_EMBED_PREFIXES = ("patch_embed.",)
_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
_MERGE = re.compile(r"layers\.(\d+)\.downsample\.")


def layer_id(name: str, depths: Sequence[int]) -> int:
    """The layer id of parameter ``name`` for layer-wise lr decay, numbered as the Swin release.

    With L = sum(depths): the patch embedding (and ``mask_token``) is 0; block j of stage i is
    sum(depths[:i]) + j + 1; the patch merging at the end of stage i takes the id of that stage's
    last block, sum(depths[:i + 1]); everything else (final norm, head, ``absolute_pos_embed``, any
    name it does not know) is L + 1. A leading 'encoder.' (SimMIM's wrapper) is ignored.

    >>> depths = (2, 2, 18, 2)
    >>> layer_id("patch_embed.proj.weight", depths), layer_id("encoder.mask_token", depths)
    (0, 0)
    >>> layer_id("layers.0.blocks.0.attn.qkv.weight", depths)
    1
    >>> layer_id("layers.2.blocks.5.mlp.fc1.bias", depths)
    10
    >>> layer_id("layers.1.downsample.reduction.weight", depths)
    4
    >>> layer_id("norm.weight", depths), layer_id("head.bias", depths), layer_id("decoder.0.weight", depths)
    (25, 25, 25)
    """
    if name.startswith("encoder."):
        name = name[len("encoder.") :]
    if name in _EMBED_NAMES or name.startswith(_EMBED_PREFIXES):
        return 0
    m = _BLOCK.match(name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return sum(depths[:stage]) + block + 1
    m = _MERGE.match(name)
    if m:
        return sum(depths[: int(m.group(1)) + 1])
    return sum(depths) + 1


def model_depths(model: nn.Module) -> list[int] | None:
    """Blocks per stage: ``model.depths``, else counted from ``model.layers[i].blocks``.

    Looks through SimMIM's ``encoder`` too; None for a model with neither.
    """
    model = _unwrap(model)
    for m in (model, getattr(model, "encoder", None)):
        if not isinstance(m, nn.Module):
            continue
        depths = getattr(m, "depths", None)
        if depths is not None:
            return [int(d) for d in depths]
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and all(hasattr(s, "blocks") for s in layers):
            return [len(s.blocks) for s in layers]
    return None


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Trainable parameters in groups by weight decay and, with ``layer_decay`` < 1, by layer.

    No weight decay for: 1-D tensors, names ending in '.bias', names in ``model.no_weight_decay()``,
    names containing a keyword from ``model.no_weight_decay_keywords()`` or NO_DECAY_KEYWORDS.

    ``layer_decay`` 1.0: a decayed and a non-decayed group, named 'decay' / 'no_decay'.
    Otherwise one group per (layer id, decay / no decay), named e.g. 'layer_3_decay', with
    ``lr_scale`` = layer_decay ** (L + 1 - id) (ids from :func:`layer_id`, L = sum of depths);
    the schedulers multiply each group's lr by it. Groups come last layer first, so
    ``param_groups[0]`` (what the training log shows) has the full lr. Empty groups are dropped.
    A layer decay outside (0, 1], or one asked of a model without stages, raises UserError.
    """
    model = _unwrap(model)
    layer_decay = float(layer_decay)
    depths: list[int] | None = None
    if layer_decay != 1.0:
        if not 0.0 < layer_decay <= 1.0:
            raise UserError(
                f"TRAIN.LAYER_DECAY must be in (0, 1] (1.0 = off, the release fine-tunes with 0.75), not {layer_decay}"
            )
        depths = model_depths(model)
        if depths is None:
            raise UserError(
                f"TRAIN.LAYER_DECAY {layer_decay} needs a model with Swin stages (layers.N.blocks); "
                f"{type(model).__name__} has none: set TRAIN.LAYER_DECAY 1.0"
            )
    skip = _names_from(model, "no_weight_decay")
    keywords = tuple(_names_from(model, "no_weight_decay_keywords")) + NO_DECAY_KEYWORDS
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen parameters must not be stepped (weight decay would still move them)
        no_wd = p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords)
        lid = 0 if depths is None else layer_id(name, depths)
        key = (lid, no_wd)
        if key not in groups:
            kind = "no_decay" if no_wd else "decay"
            groups[key] = {"params": [], "weight_decay": 0.0 if no_wd else float(weight_decay), "name": kind}
            if depths is not None:
                groups[key]["name"] = f"layer_{lid}_{kind}"
                groups[key]["lr_scale"] = layer_decay ** (sum(depths) + 1 - lid)
        groups[key]["params"].append(p)
    # Last layer first, then decayed before non-decayed (with layer decay off: 'decay', 'no_decay').
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


def groups_table(groups: list[dict[str, Any]]) -> str:
    """The layer-wise groups as a text table: one row per layer id, its lr scale, and the
    tensors / elements with and without weight decay."""
    rows: dict[int, dict[str, Any]] = {}
    for g in groups:
        m = re.fullmatch(r"layer_(\d+)_(decay|no_decay)", str(g.get("name", "")))
        lid = int(m.group(1)) if m else -1
        row = rows.setdefault(lid, {"scale": float(g.get("lr_scale", 1.0)), "decay": (0, 0), "no_decay": (0, 0)})
        kind = "decay" if g["weight_decay"] else "no_decay"
        t, n = row[kind]
        row[kind] = (t + len(g["params"]), n + sum(p.numel() for p in g["params"]))
    header = f"{'layer':>5}  {'lr scale':>9}  {'decay tensors/elements':>24}  {'no-decay tensors/elements':>27}"
    lines = [header]
    for lid in sorted(rows):
        r = rows[lid]
        cells = [f"{r[k][0]:>4} / {r[k][1]:>14,}" for k in ("decay", "no_decay")]
        lines.append(f"{lid if lid >= 0 else '?':>5}  {r['scale']:>9.4g}  {cells[0]:>24}  {cells[1]:>27}")
    return "\n".join(lines)


def _impl_kwargs(impl: str, params: Iterable[torch.Tensor]) -> dict[str, bool]:
    key = str(impl).strip().lower()
    if key not in _IMPLS:
        raise UserError(f"TRAIN.OPTIMIZER.IMPL must be one of {', '.join(_IMPLS)}, not {impl!r}")
    if key == "auto":
        # Fused kernels, on CUDA and (torch >= 2.4) on the CPU: Swin-T's AdamW step on a 2-core
        # AVX2 EPYC took 24.5 ms fused against 129.5 ms foreach (multi-tensor), the fast path
        # for any other device.
        fusable = all(p.device.type in ("cuda", "cpu") for p in params)
        return {"fused": True} if fusable else {"foreach": True}
    if key == "fused":
        return {"fused": True}
    if key == "foreach":
        return {"foreach": True}
    return {"foreach": False, "fused": False}


def build_optimizer(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD (per TRAIN.OPTIMIZER.NAME) over :func:`param_groups` with lr=TRAIN.BASE_LR.

    With TRAIN.LAYER_DECAY < 1 the groups are per layer (each lr = TRAIN.BASE_LR x its
    ``lr_scale``), and a table of them is logged once at INFO.

    The scheduler (lr_scheduler.build_scheduler) sets the real, scaled learning rate. Unknown
    names or implementations raise UserError. Build it after moving the model to its device
    (the 'auto' implementation looks at where the parameters are).
    """
    opt_cfg = config.TRAIN.OPTIMIZER
    layer_decay = float(getattr(config.TRAIN, "LAYER_DECAY", 1.0))
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY, layer_decay)
    if not groups:
        raise UserError("the model has no trainable parameters; nothing to optimize")
    name = str(opt_cfg.NAME).strip().lower()
    if name not in ("adamw", "sgd"):
        raise UserError(f"unknown optimizer {opt_cfg.NAME!r} in TRAIN.OPTIMIZER.NAME; use 'adamw' or 'sgd'")
    impl = _impl_kwargs(opt_cfg.IMPL, [p for g in groups for p in g["params"]])
    lr = float(config.TRAIN.BASE_LR)
    for g in groups:
        if "lr_scale" in g:
            g["lr"] = lr * g["lr_scale"]  # right even before a scheduler sets the real lr
    if layer_decay != 1.0:
        depths = model_depths(model) or []
        logger.info(
            "layer-wise lr decay %g: lr x %g^(%d - layer id) over %d param groups\n%s",
            layer_decay,
            layer_decay,
            sum(depths) + 1,
            len(groups),
            groups_table(groups),
        )

    def make(impl: dict[str, bool]) -> torch.optim.Optimizer:
        # Copies: the optimizer writes its defaults (fused=True...) into the group dicts it gets,
        # and a retry must not inherit them.
        fresh = [dict(g) for g in groups]
        if name == "adamw":
            return torch.optim.AdamW(fresh, lr=lr, eps=float(opt_cfg.EPS), betas=tuple(opt_cfg.BETAS), **impl)
        return torch.optim.SGD(fresh, lr=lr, momentum=float(opt_cfg.MOMENTUM), nesterov=True, **impl)

    try:
        optimizer = make(impl)
    except RuntimeError as e:
        # e.g. fused kernels this torch lacks for the device or dtype: 'auto' takes foreach instead
        reason = (str(e).splitlines() or ["error"])[0]
        if impl.get("fused") and str(opt_cfg.IMPL).strip().lower() == "auto":
            logger.info("optimizer: no fused %s here (%s); foreach instead", name, reason)
            return make({"foreach": True})
        raise UserError(f"TRAIN.OPTIMIZER.IMPL {opt_cfg.IMPL!r} does not work here ({reason}); use 'auto'") from None
    if name == "sgd":
        _zero_momentum_buffers(optimizer)
    return optimizer


def _zero_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer before the first step.

    Fused SGD allocates the buffers uninitialised on its first step and fills them in the
    kernel; when that step is skipped (``found_inf``: a non-finite gradient, or fp16's first
    scale overflowing) the kernel returns early and the garbage stays as momentum. A zero buffer
    gives the same first update as torch's lazily created one (``buf = grad``; dampening 0).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))


# Per-group flags that choose torch's implementation, not the optimisation itself.
_IMPL_FLAGS = ("foreach", "fused", "capturable")


def _layer_decay_of(groups: list[dict[str, Any]]) -> float:
    """The layer decay that gave these groups their ``lr_scale`` (1.0 for groups without one)."""
    scaled = []
    for g in groups:
        m = re.fullmatch(r"layer_(\d+)_(?:no_)?decay", str(g.get("name", "")))
        if m and "lr_scale" in g:
            scaled.append((int(m.group(1)), float(g["lr_scale"])))
    if not scaled:
        return 1.0
    top = max(lid for lid, _ in scaled)
    lid, scale = min(scaled)
    # The top layer has scale 1 in practice; divide by its scale in case it is frozen/absent.
    top_scale = max(s for i, s in scaled if i == top)
    return (scale / top_scale) ** (1.0 / (top - lid)) if top > lid and scale > 0 else 1.0


def _check_same_groups(current: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    """UserError unless ``saved`` (a state dict's param_groups) has this optimizer's groups."""
    same = len(saved) == len(current) and all(
        len(s.get("params", [])) == len(c["params"])
        and abs(float(s.get("lr_scale", 1.0)) - float(c.get("lr_scale", 1.0)))
        <= 1e-9 * max(1.0, float(c.get("lr_scale", 1.0)))
        for s, c in zip(saved, current, strict=False)
    )
    if same:
        return
    was, now = _layer_decay_of(saved), _layer_decay_of(current)
    if abs(was - now) > 1e-6:
        raise UserError(
            f"the checkpoint was trained with TRAIN.LAYER_DECAY {was:g}, this run uses {now:g}; "
            f"resume with --opts TRAIN.LAYER_DECAY {was:g} (or start from its weights with --pretrained)"
        )
    raise UserError(
        f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's {len(current)} "
        "(other trainable parameters or TRAIN.LAYER_DECAY); resume with the same config, or use --pretrained"
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's implementation flags.

    A saved state brings back the flags of the run that wrote it: a checkpoint written on the CPU
    (foreach) would turn a fused CUDA AdamW into foreach, and the fp16 scaler's step then fails;
    the reverse asks for fused kernels the CPU may lack. Moments, steps and lrs come from
    ``state``; the flags are re-applied from the optimizer as built here.

    A state of other parameter groups (another TRAIN.LAYER_DECAY: other groups or other lr
    scales) raises UserError.
    """
    _check_same_groups(optimizer.param_groups, state.get("param_groups", []))
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
