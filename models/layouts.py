"""State-dict layouts of the same Swin weights, and the key maps between them.

Three libraries store one architecture under different names:

* ``official`` (the release, and this project): ``patch_embed.*``, ``layers.{i}.blocks.{j}.*``,
  the patch merging that ends stage i as ``layers.{i}.downsample.*`` (i < last), ``norm``,
  ``head``; V2 attention has separate ``q_bias`` / ``v_bias``.
* ``timm``: the same names, but patch merging opens the next stage (``layers.{i+1}.downsample``)
  and the classifier is ``head.fc``.
* ``torchvision`` (``swin_t``/``swin_v2_t`` …): everything under ``features``: ``features.0.0`` the
  patch convolution, ``features.0.2`` its norm, stage i's blocks ``features.{2i+1}.{j}``, the
  merging after it ``features.{2i+2}``, MLPs as ``mlp.0``/``mlp.3``; V2 keeps one ``qkv.bias``
  of 3C whose key third is zero.

:func:`detect_layout` names the layout of a state dict; :func:`to_official` and
:func:`from_official` map between them. Buffers derived from the window (position indices,
coordinate tables, masks) are dropped: every model rebuilds its own.
"""

from __future__ import annotations

import re

import torch

from errors import UserError

LAYOUTS = ("official", "timm", "torchvision")
# Buffers each library derives from the window size; never carried across layouts.
_DERIVED = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")

_TIMM_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.(.*)$")
_TV_FEATURE = re.compile(r"^features\.(\d+)\.(.*)$")


def _is_derived(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _DERIVED


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'official', 'timm' or 'torchvision' for a Swin state dict (keys without 'module.').

    torchvision: ``features.0.0.weight`` (the patch convolution). timm: ``head.fc.weight``, or
    merging keys under ``layers.{i}.downsample`` with none under ``layers.0.downsample`` (timm's
    first stage never merges; the release's last stage never does). official: ``patch_embed``
    with neither. Anything else is a ``UserError`` listing the known layouts and the first keys.
    """
    keys = list(state)
    if "features.0.0.weight" in state:
        return "torchvision"
    merges = {int(m.group(1)) for k in keys if (m := _TIMM_MERGE.match(k))}
    if "head.fc.weight" in state or (merges and 0 not in merges):
        return "timm"
    if any(k.startswith("patch_embed.") for k in keys):
        return "official"
    shown = ", ".join(keys[:5]) or "none"
    raise UserError(
        f"unrecognised checkpoint layout (first keys: {shown}); known layouts: official/this project "
        "(patch_embed.*, layers.N.blocks.*), timm (head.fc), torchvision (features.*), and SimMIM (encoder.*)"
    )


def _timm_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = _TIMM_MERGE.match(key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc.") :]
        out[key] = value
    return out


def _official_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = _TIMM_MERGE.match(key)
        if m:
            key = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        elif key.startswith("head."):
            key = "head.fc." + key[len("head.") :]
        out[key] = value
    return out


_TV_MLP = re.compile(r"^mlp\.([03])\.")


def _torchvision_block_key(rest: str) -> str:
    """A torchvision block's key in the official names (its MLP is a Sequential; V2's
    ``attn.cpb_mlp.0`` keeps its name)."""
    return _TV_MLP.sub(lambda m: "mlp.fc1." if m.group(1) == "0" else "mlp.fc2.", rest)


def _torchvision_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _TV_FEATURE.match(key)
        if not m:
            out[key] = value  # norm.*, head.*
            continue
        index, rest = int(m.group(1)), m.group(2)
        if index == 0:
            # features.0 = Conv2d, Permute, LayerNorm
            out[{"0": "patch_embed.proj", "2": "patch_embed.norm"}[rest.split(".")[0]] + rest[1:]] = value
        elif index % 2 == 1:
            block, inner = rest.split(".", 1)
            new = f"layers.{(index - 1) // 2}.blocks.{block}.{_torchvision_block_key(inner)}"
            if new.endswith("attn.qkv.bias") and any(k.endswith(".cpb_mlp.0.weight") for k in state):
                # V2: q and v biases are parameters, the key bias is a constant zero.
                q, _, v = value.chunk(3)
                out[new.replace("qkv.bias", "q_bias")], out[new.replace("qkv.bias", "v_bias")] = q, v
                continue
            out[new] = value
        else:
            out[f"layers.{index // 2 - 1}.downsample.{rest}"] = value
    return out


def to_official(state: dict[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """``state`` in the official layout (``layout`` detected when None); derived buffers dropped."""
    layout = layout or detect_layout(state)
    state = {k: v for k, v in state.items() if not _is_derived(k)}
    if layout == "timm":
        return _timm_to_official(state)
    if layout == "torchvision":
        return _torchvision_to_official(state)
    if layout == "official":
        return state
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def from_official(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """An official-layout ``state`` written as ``layout`` ('official' or 'timm'); derived buffers dropped."""
    state = {k: v for k, v in state.items() if not _is_derived(k)}
    if layout == "official":
        return state
    if layout == "timm":
        return _official_to_timm(state)
    raise UserError(f"cannot write the {layout!r} layout; use 'official' or 'timm'")
