"""Loading released (or our own) weights into a Swin model, adapting what legitimately differs.

``load_pretrained(model, path)`` is the one entry point, used by ``--pretrained`` and by people's
own code, for V1 and V2 alike. It drops derived buffers (rebuilt for the model's window and size),
resizes V1's relative position bias tables and absolute position embeddings to the model's window
and grid (bicubic, as the release fine-tunes 224→384; a SimMIM checkpoint's tables geometrically,
as the release fine-tunes those; V2 has no table to resize: its position-bias MLP carries over to
any window, given ``PRETRAINED_WINDOW_SIZES``), reads SimMIM pre-training checkpoints as the
encoder they hold, maps a 21,841-class ImageNet-22K head onto the 1,000
ImageNet-1K classes, and re-initialises any other head of the wrong size. A checkpoint of the
other family (V1 for a V2 model, or the reverse) is refused in one line; anything else that does
not fit is an error that lists the mismatches.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from models.layouts import detect_layout, to_official

logger = logging.getLogger(__name__)

IMAGENET22K_CLASSES = 21841
IMAGENET1K_CLASSES = 1000
# ImageNet-1K class 850 (n04399382, teddy bear) is absent from the 22K synset list; the release
# maps it to this 22K row.
_TEDDY_BEAR_1K = 850
_TEDDY_BEAR_22K = 5564
# Buffers computed from the window size; released checkpoints carry them but they are never loaded.
DERIVED_KEYS = ("relative_position_index", "attn_mask", "relative_coords_table")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` could not match, and what it adapted."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    head: str = "loaded"  # 'loaded', 'mapped-22k-to-1k', 're-initialised' or 'absent'
    # Pre-training parts a classifier has no use for (SimMIM's decoder and mask token).
    dropped: list[str] = field(default_factory=list)


def _timm_info_file(name: str) -> str:
    return os.path.join(os.path.dirname(timm.__file__), "data", "_info", name)


@lru_cache(maxsize=1)
def imagenet22k_to_1k_indices() -> tuple[int, ...]:
    """For each ImageNet-1K class (timm's ``imagenet_synsets.txt`` order), its ImageNet-22K row.

    Derived from the WordNet ids in the class lists timm ships; returns 1,000 indices.
    """
    with open(_timm_info_file("imagenet_synsets.txt")) as f:
        synsets_1k = f.read().split()
    with open(_timm_info_file("imagenet21k_goog_synsets.txt")) as f:
        row_of = {wnid: i for i, wnid in enumerate(f.read().split())}
    indices = []
    for cls, wnid in enumerate(synsets_1k):
        if wnid in row_of:
            indices.append(row_of[wnid])
        elif cls == _TEDDY_BEAR_1K:
            indices.append(_TEDDY_BEAR_22K)
        else:  # the shipped lists changed under us: refuse rather than map silently wrong
            raise RuntimeError(f"ImageNet-1K class {cls} ({wnid}) has no ImageNet-22K row")
    return tuple(indices)


def resize_relative_position_bias_table(table: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Resize a bias table to another window, per head, as a (2M-1)×(2M-1) grid (bicubic).

    Args:
        table: ((2M-1)², heads).
        num_rows: (2M'-1)², the target number of rows.
    Returns:
        (num_rows, heads).
    """
    old, heads = table.shape
    s_old, s_new = int(math.isqrt(old)), int(math.isqrt(num_rows))
    grid = table.float().permute(1, 0).reshape(1, heads, s_old, s_old)
    grid = F.interpolate(grid, size=(s_new, s_new), mode="bicubic", align_corners=False)
    return grid.reshape(heads, num_rows).permute(1, 0).to(table.dtype)


def geometric_ratio(src_half: int, dst_half: int) -> float:
    """The ratio q in (1.01, 1.5) with 1 + q + ... + q^(src_half - 1) = dst_half, by bisection to
    1e-6 as the release's SimMIM fine-tuning finds it (1.01 when the table shrinks)."""
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q**src_half) / (1.0 - q) > dst_half:
            hi = q
        else:
            lo = q
    return q


def resize_relative_position_bias_table_geometric(table: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Resize a bias table to another window as the release fine-tunes SimMIM checkpoints.

    The source offsets 0, ±1, ±2, ... are placed at 0, ±1, ±(1 + q), ±(1 + q + q²), ... with q
    from :func:`geometric_ratio` (near offsets keep their spacing, far ones stretch to the new
    window's edge), and an interpolating bicubic spline through them (FITPACK's, as the release's
    ``scipy.interpolate.interp2d(kind='cubic')``; points past the outermost offset take the
    edge's value) is read at the target's integer offsets. Arguments and result as
    :func:`resize_relative_position_bias_table`'s.
    """
    import numpy as np
    from scipy.interpolate import RectBivariateSpline

    old, heads = table.shape
    s_old, s_new = int(math.isqrt(old)), int(math.isqrt(num_rows))
    q = geometric_ratio(s_old // 2, s_new // 2)
    half = np.cumsum(q ** np.arange(s_old // 2))  # 1, 1 + q, 1 + q + q², ...
    src = np.concatenate([-half[::-1], [0.0], half])
    dst = np.arange(-(s_new // 2), s_new // 2 + 0.1, 1.0)
    grids = table.detach().float().cpu().numpy().T.reshape(heads, s_old, s_old)
    out = [RectBivariateSpline(src, src, g, kx=3, ky=3, s=0)(dst, dst) for g in grids]
    resized = torch.from_numpy(np.stack(out).reshape(heads, num_rows).T.astype(np.float32))
    return resized.to(device=table.device, dtype=table.dtype)


def _resize_abs_pos_embed(pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from models.swin_transformer import resize_pos_embed

    old, new = int(math.isqrt(pos.shape[1])), int(math.isqrt(target.shape[1]))
    return resize_pos_embed(pos, (old, old), (new, new))


def extract_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict: its 'model' (or 'state_dict') entry, else itself."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in checkpoint.items()}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _simmim_encoder_keys(
    state: dict[str, torch.Tensor], report: LoadReport, keep_mask_token: bool = False
) -> dict[str, torch.Tensor]:
    """A SimMIM pre-training checkpoint as the plain encoder it holds.

    The release's SimMIM checkpoints keep the encoder under ``encoder.`` next to ``decoder.*``
    and ``encoder.mask_token``; fine-tuning drops both (listed in ``report.dropped``), while
    ``keep_mask_token`` keeps the learned token for an encoder that has one (SimMIM pre-training
    going on from such weights). Older V2 ones name the position-bias MLP ``rpe_mlp``.
    """
    if any(k.startswith("encoder.") for k in state):
        token = () if keep_mask_token else ("encoder.mask_token",)
        report.dropped += [k for k in state if not k.startswith("encoder.") or k in token]
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        if not keep_mask_token:
            state.pop("mask_token", None)
    return {k.replace(".rpe_mlp.", ".cpb_mlp."): v for k, v in state.items()}


# Parameter names only one family has: V1's learned bias table, V2's bias MLP and temperature.
_FAMILY_MARKERS = {"Swin V1": ("relative_position_bias_table",), "Swin V2": ("cpb_mlp", "logit_scale")}
_MODEL_TYPE = {"Swin V1": "swin", "Swin V2": "swinv2"}


def _family(keys) -> str | None:
    """'Swin V1', 'Swin V2' or None (neither marker: e.g. a V1 model without position bias)."""
    for family, markers in _FAMILY_MARKERS.items():
        if any(m in k for k in keys for m in markers):
            return family
    return None


def _check_family(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    ours, theirs = _family(own), _family(state)
    if ours and theirs and ours != theirs:
        raise UserError(
            f"{source} holds a {theirs} model but the config builds a {ours} model (MODEL.TYPE "
            f"{_MODEL_TYPE[ours]}); use a {theirs} config (MODEL.TYPE {_MODEL_TYPE[theirs]}) or a {ours} checkpoint"
        )


def adapt_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Make ``state`` fit ``model`` (see module docstring); raises UserError on a wrong architecture."""
    own = model.state_dict()
    # SimMIM's fine-tuning resizes bias tables geometrically, the supervised one bicubically.
    resize_table = resize_relative_position_bias_table
    if not any(k.startswith("encoder.") for k in own):
        if any(k.startswith("encoder.") for k in state):
            resize_table = resize_relative_position_bias_table_geometric
        # A classifier (or backbone) loading a SimMIM checkpoint; a SimMIM model keeps the keys as they are.
        state = _simmim_encoder_keys(state, report, keep_mask_token="mask_token" in own)
        layout = detect_layout(state)
        if layout != "official":
            logger.info("%s is in %s's layout: keys mapped to the release's", source, layout)
            state = to_official(state, layout)
    _check_family(own, state, source)
    out: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in DERIVED_KEYS:
            continue
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if value.shape == target.shape:
            out[key] = value
        elif key.endswith("relative_position_bias_table") and value.shape[1] == target.shape[1]:
            out[key] = resize_table(value, target.shape[0])
            report.resized.append(key)
        elif key.endswith("absolute_pos_embed") and value.shape[2] == target.shape[2]:
            out[key] = _resize_abs_pos_embed(value, target)
            report.resized.append(key)
        elif key.startswith("head."):
            continue  # decided below, with the other head tensor
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
    if mismatched:
        shown = "; ".join(mismatched[:4]) + (f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else "")
        raise UserError(
            f"checkpoint does not fit this architecture ({len(mismatched)} mismatched): {shown}; "
            "check --cfg against the checkpoint"
        )
    tables = [k for k in report.resized if k.endswith("relative_position_bias_table")]
    if tables and resize_table is resize_relative_position_bias_table_geometric:
        logger.info(
            "%s: %d bias tables resized geometrically, as the release fine-tunes SimMIM checkpoints",
            source,
            len(tables),
        )
    _adapt_head(model, state, own, out, report)
    return out


def _adapt_head(model: nn.Module, state: dict, own: dict, out: dict, report: LoadReport) -> None:
    if "head.weight" not in own:
        report.head = "absent"
        return
    if "head.weight" not in state:
        report.head = "re-initialised"
        _zero_head(model)
        return
    w, b = state["head.weight"], state.get("head.bias")
    n_ckpt, n_model = w.shape[0], own["head.weight"].shape[0]
    if n_ckpt == n_model:
        out["head.weight"] = w
        if b is not None:
            out["head.bias"] = b
    elif n_ckpt == IMAGENET22K_CLASSES and n_model == IMAGENET1K_CLASSES:
        rows = torch.tensor(imagenet22k_to_1k_indices())
        out["head.weight"] = w[rows]
        if b is not None:
            out["head.bias"] = b[rows]
        report.head = "mapped-22k-to-1k"
    else:
        logger.warning("checkpoint head has %d classes, model has %d: head re-initialised to zero", n_ckpt, n_model)
        _zero_head(model)
        report.head = "re-initialised"


def _zero_head(model: nn.Module) -> None:
    # Zero, as the release does: the fine-tuned model starts from uniform predictions.
    with torch.no_grad():
        model.head.weight.zero_()
        if model.head.bias is not None:
            model.head.bias.zero_()


PURPOSES = ("finetune", "resume", "inference")


def load_weights(
    model: nn.Module, source: str | dict, purpose: str = "finetune", name: str | None = None
) -> LoadReport:
    """The one way weights get into a model: ``--pretrained``, ``--resume``/``--eval``, predict, explain.

    ``source``: a path (.pth/.pt/.safetensors) or a checkpoint dict already read (``name`` then
    names it in messages). Any layout :func:`adapt_state_dict` knows is accepted. ``purpose``:

    * 'finetune': adapt what legitimately differs (tables and embeddings resized, the head mapped
      22K→1K or re-initialised, SimMIM's decoder dropped); the report says what.
    * 'resume' (training or evaluation): the same architecture only: no resized, unexpected or
      missing weight, and the head must fit; each is a one-line ``UserError``.
    * 'inference' (predict, explain): as 'resume', but a 22K head mapped to the 1K classes is fine.
    """
    from checkpoint import load_checkpoint_file

    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    checkpoint = load_checkpoint_file(source) if isinstance(source, str) else source
    name = name or (source if isinstance(source, str) else "checkpoint")
    report = LoadReport()
    state = adapt_state_dict(model, extract_state_dict(checkpoint), report, source=name)
    if purpose != "finetune":
        _require_same_architecture(report, name, purpose)
    result = model.load_state_dict(state, strict=False)
    report.missing = [k for k in result.missing_keys if not (k.startswith("head.") and report.head == "re-initialised")]
    if purpose != "finetune" and report.missing:
        raise UserError(
            f"{name} lacks {len(report.missing)} weights of this model (e.g. {report.missing[:3]}); check --cfg"
        )
    if report.dropped:
        logger.info(
            "%s is a SimMIM pre-training checkpoint: its encoder is loaded; %d pre-training tensors dropped (%s)",
            name,
            len(report.dropped),
            ", ".join(report.dropped[:4]),
        )
    logger.info(
        "loaded %s for %s: %d tensors, head %s, resized %d, missing %d %s, unexpected %d %s",
        name,
        purpose,
        len(state),
        report.head,
        len(report.resized),
        len(report.missing),
        report.missing[:6],
        len(report.unexpected),
        report.unexpected[:6],
    )
    return report


def _require_same_architecture(report: LoadReport, name: str, purpose: str) -> None:
    heads = ("loaded", "absent", "mapped-22k-to-1k") if purpose == "inference" else ("loaded", "absent")
    if report.head not in heads:
        raise UserError(f"{name} has a classifier for another number of classes; use --pretrained to fine-tune from it")
    # A deeper model's extra blocks dropped, or tables of another window resized, would load
    # without a word: that is another architecture.
    if report.unexpected:
        raise UserError(
            f"{name} has {len(report.unexpected)} weights this model lacks (e.g. {report.unexpected[:3]}); "
            "it is another architecture: check --cfg (or fine-tune from it with --pretrained)"
        )
    if report.resized:
        raise UserError(
            f"{name} has {len(report.resized)} tensors of another window or image size (e.g. "
            f"{report.resized[:2]}); check --cfg (or fine-tune from it with --pretrained)"
        )


def load_pretrained(model: nn.Module, path: str) -> LoadReport:
    """Load weights from ``path`` (.pth/.pt checkpoint or .safetensors) into ``model`` for fine-tuning:
    ``load_weights(model, path, 'finetune')``. Optimizer and epoch are not restored."""
    return load_weights(model, path, "finetune")
