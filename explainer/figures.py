"""The paper's figures drawn from the real model (V1 or V2), as PNG files.

``plot_windows`` → ``windows.png``: regular and shifted window partition (Swin paper Fig. 2), the
window of every token found by running the model's own shift + partition.
``plot_cyclic_shift_mask`` → ``cyclic_shift_mask.png``: cyclic shift and the model's own attention
mask, ``block.attention_mask(H, W)`` (Fig. 4).
``plot_relative_position`` → ``relative_position.png``: the block's ``relative_position_index`` and
one head's bias B = ``relative_position_bias()`` (V1's learned table, V2's table 16·σ(MLP(Δ̂))
from ``bias_table()``).
``plot_attention`` → ``attention.png``: attention of a few query tokens of one block and head over
their window, on top of the image; the maps are the walk's (:mod:`explainer.walk`), put back on
the map through the model's window reverse + unshift.

Stages and blocks are numbered from 1 (``block=(1, 2)`` is stage 1, block 2, as the walk prints
them); heads from 0. Matplotlib is imported only when a figure is drawn (Agg canvas, no pyplot).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from errors import UserError
from explainer.walk import BlockId, trace
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import CPB_BIAS_SCALE, WindowAttentionV2
from models.windows import WindowBlockBase, window_reverse
from models.windows import roll_reverse_unshift as reverse_unshift
from models.windows import roll_shift_partition as shift_partition


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot state

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return path


@dataclass
class Geometry:
    """The feature map the window figures are drawn on."""

    height: int
    width: int
    window_size: int
    shift_size: int
    block: WindowBlockBase  # whose attention_mask() is drawn (V1 or V2: the same shift mask)
    note: str


def figure_geometry(model: SwinTransformer, max_side: int = 16) -> Geometry:
    """Stage 1's map and shifted block if the map is at most ``max_side`` tokens a side; else a
    2M×2M map with the configured M; else (M > ``max_side``/2) 8×8 with M=4."""
    layer = model.layers[0]
    H1, W1 = (int(v) for v in model.patches_resolution)
    M = layer.blocks[0].window_size
    shifted = next((b for b in layer.blocks if b.shift_size > 0), None)
    if shifted is not None:
        s = shifted.shift_size
        if max(H1, W1) <= max_side and H1 % M == 0 and W1 % M == 0:
            return Geometry(H1, W1, M, s, shifted, f"stage-1 feature map {H1}×{W1}, M={M}, shift {s}")
        if 2 * M <= max_side:
            return Geometry(
                2 * M, 2 * M, M, s, shifted, f"{2 * M}×{2 * M} map, configured M={M}, shift {s} (stage 1 is {H1}×{W1})"
            )
    # A stand-in block of the model's own family: its attention_mask() is the shared plumbing.
    blk = type(layer.blocks[0])(dim=4, num_heads=1, window_size=4, shift_size=2)
    why = f"configured M={M}" + ("" if shifted is not None else ", model does not shift")
    return Geometry(8, 8, 4, 2, blk, f"8×8 map with M=4, shift 2 for legibility ({why}, stage 1 is {H1}×{W1})")


def _window_ids(height: int, width: int, window_size: int, shift: int) -> torch.Tensor:
    """For each token of the map, the window it lands in after the model's (shift and) partition."""
    idx = torch.arange(height * width, dtype=torch.float32).view(1, height, width, 1)
    windows = shift_partition(idx, shift, window_size)  # nW, M, M, 1
    ids = torch.arange(windows.shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand_as(windows)
    # Undo the model's (shift and) partition on the ids: each token gets its window's number back.
    return reverse_unshift(ids.contiguous(), shift, window_size, height, width)[0, :, :, 0].long()


def _shifted_regions(height: int, width: int, window_size: int, shift: int) -> torch.Tensor:
    """The sub-windows of the shifted partition (paper Fig. 2, right): each cyclic window split
    where the tokens it gathers came from different sides of the wrap-around."""
    M, s = window_size, shift
    rows = (torch.arange(height) + M - s) // M
    cols = (torch.arange(width) + M - s) // M
    return rows[:, None] * int(cols.max() + 1) + cols[None, :]


def _palette():
    """Up to 60 distinct colours (tab20, tab20b, tab20c), so that regions rarely share one."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    colors = [c for name in ("tab20", "tab20b", "tab20c") for c in matplotlib.colormaps[name].colors]
    return ListedColormap(colors), len(colors)


def _show_ids(ax, ids: torch.Tensor):
    cmap, n = _palette()
    return ax.imshow(ids.numpy() % n, cmap=cmap, vmin=0, vmax=n - 1, alpha=0.55, interpolation="nearest")


def _grid(ax, height: int, width: int, window_size: int, offset: int, color: str = "black") -> None:
    """Token grid (thin) and window boundaries (thick) displaced by ``offset`` tokens."""
    for i in range(height + 1):
        ax.axhline(i - 0.5, color="0.75", lw=0.5)
    for j in range(width + 1):
        ax.axvline(j - 0.5, color="0.75", lw=0.5)
    for b in range(-window_size, max(height, width) + window_size, window_size):
        pos = b + offset
        if 0 <= pos <= height:
            ax.axhline(pos - 0.5, color=color, lw=2.2)
        if 0 <= pos <= width:
            ax.axvline(pos - 0.5, color=color, lw=2.2)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_windows(model: SwinTransformer, path: str) -> dict[str, Any]:
    """Paper Fig. 2: regular windows of layer l and shifted windows of layer l+1.

    Returns the window id of every token: 'regular' (the model's partition), 'shifted' (the
    sub-windows of the shifted partition), 'cyclic' (the model's shift + partition) and 'geometry'.
    """
    g = figure_geometry(model)
    H, W, M, s = g.height, g.width, g.window_size, g.shift_size
    regular = _window_ids(H, W, M, 0)
    shifted = _shifted_regions(H, W, M, s)
    cyclic = _window_ids(H, W, M, s)
    fig = _figure(10, 5.4)
    axes = fig.subplots(1, 2)
    im0 = _show_ids(axes[0], regular)
    _grid(axes[0], H, W, M, 0)
    axes[0].set_title(f"Layer l: regular windows (W-MSA)\n{int(regular.max()) + 1} windows of {M}×{M}")
    _show_ids(axes[1], shifted)
    _grid(axes[1], H, W, M, s % M, color="crimson")
    axes[1].set_title(
        f"Layer l+1: windows shifted by ({s}, {s}) (SW-MSA)\n{int(shifted.max()) + 1} windows, "
        f"computed as {int(cyclic.max()) + 1} by cyclic shift"
    )
    fig.suptitle(f"Shifted window partition (Swin paper Fig. 2) — {g.note}", fontsize=10)
    _save(fig, path)
    # Colours repeat every 60 windows; the ids themselves are returned.
    assert np.array_equal(np.asarray(im0.get_array()), regular.numpy() % _palette()[1])
    return {"regular": regular.numpy(), "shifted": shifted.numpy(), "cyclic": cyclic.numpy(), "geometry": g}


def _letters(n: int) -> list[str]:
    out = []
    for i in range(n):
        name, j = "", i
        while True:
            name = chr(ord("A") + j % 26) + name
            j = j // 26 - 1
            if j < 0:
                break
        out.append(name)
    return out


def _label_regions(ax, labels: torch.Tensor, names: list[str]) -> None:
    """Write each region's letter once, at the centre of its largest connected run."""
    H, W = labels.shape
    for v in torch.unique(labels).tolist():
        ys, xs = torch.nonzero(labels == v, as_tuple=True)
        ax.text(
            float(xs.float().mean()),
            float(ys.float().mean()),
            names[v],
            ha="center",
            va="center",
            fontsize=11 if H <= 16 else 8,
            fontweight="bold",
        )


def plot_cyclic_shift_mask(model: SwinTransformer, path: str) -> dict[str, Any]:
    """Paper Fig. 4: shifted-window regions before and after the cyclic roll, and the attention mask
    the batched windows need. The mask panels show ``block.attention_mask(H, W)`` of the model.

    Returns the arrays drawn: 'labels_before', 'labels_after' (H, W), 'mask' (nW, M², M²) read
    back from the drawn images, 'model_mask' (the block's mask), 'labels_agree' (whether
    "different region" matches "masked" for every pair in every window) and 'geometry'.
    """
    g = figure_geometry(model)
    H, W, M, s = g.height, g.width, g.window_size, g.shift_size
    model_mask = g.block.attention_mask(H, W, torch.device("cpu"))
    if model_mask is None:
        raise ValueError("the block drawn does not shift; no mask")
    before = _shifted_regions(H, W, M, s)
    label_map = before.float().view(1, H, W, 1)
    label_windows = shift_partition(label_map, s, M)  # the block's roll + partition
    after = window_reverse(label_windows, M, H, W)[0, :, :, 0].long()  # rolled map, windows in place
    flat = label_windows.view(-1, M * M)
    agree = bool(((flat[:, :, None] != flat[:, None, :]) == (model_mask != 0)).all())
    names = _letters(int(before.max()) + 1)
    nH, nW_ = H // M, W // M

    fig = _figure(15, 5.6, layout=None)
    outer = fig.add_gridspec(1, 3, width_ratios=[1, 1, 1.1], wspace=0.15)
    ax0 = fig.add_subplot(outer[0])
    _show_ids(ax0, before)
    _grid(ax0, H, W, M, s % M, color="crimson")
    _label_regions(ax0, before, names)
    ax0.set_title(f"Shifted windows, before the roll\n({len(names)} regions)", fontsize=10)
    ax1 = fig.add_subplot(outer[1])
    _show_ids(ax1, after)
    _grid(ax1, H, W, M, 0)
    _label_regions(ax1, after, names)
    ax1.set_title(
        f"After the cyclic shift torch.roll(-{s}, -{s}):\n{nH * nW_} regular windows, some mixing regions", fontsize=10
    )
    inner = outer[2].subgridspec(nH, nW_, wspace=0.08, hspace=0.08)
    drawn = []
    for w in range(nH * nW_):
        ax = fig.add_subplot(inner[w // nW_, w % nW_])
        im = ax.imshow(
            model_mask[w].numpy(), cmap="gray", vmin=float(model_mask.min()), vmax=0, interpolation="nearest"
        )
        drawn.append(np.asarray(im.get_array()))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"window {w}" if w else "mask, window 0", fontsize=8, pad=2)
    fig.text(
        0.99,
        0.02,
        f"mask: block.attention_mask({H}, {W}) = shift_attention_mask, {M * M}×{M * M} per window; "
        f"white 0 = attend, black {float(model_mask.min()):g} = blocked",
        ha="right",
        fontsize=8,
    )
    fig.suptitle(f"Cyclic shift and masked attention (Swin paper Fig. 4) — {g.note}", fontsize=11)
    _save(fig, path)
    return {
        "labels_before": before.numpy(),
        "labels_after": after.numpy(),
        "mask": np.stack(drawn),
        "model_mask": model_mask.numpy(),
        "labels_agree": agree,
        "geometry": g,
    }


def _block(model: SwinTransformer, block: BlockId) -> WindowBlockBase:
    si, bi = block
    if not 1 <= si <= len(model.layers) or not 1 <= bi <= len(model.layers[si - 1].blocks):
        depths = [len(layer.blocks) for layer in model.layers]
        raise UserError(f"--block {si}.{bi} does not exist; stages have {depths} blocks (numbered from 1)")
    return model.layers[si - 1].blocks[bi - 1]


def _check_head(blk: WindowBlockBase, head: int) -> None:
    if not 0 <= head < blk.num_heads:
        raise UserError(f"--head {head} does not exist; this block has heads 0..{blk.num_heads - 1}")


def plot_relative_position(
    model: SwinTransformer, path: str, block: BlockId = (1, 1), head: int = 0, weights: str = "random init"
) -> dict[str, Any]:
    """The relative position index (M²×M²) of a block and one head's bias B = relative_position_bias()[head],
    also as its (2M-1)×(2M-1) table over offsets (Δy, Δx).

    V1: the learned ``relative_position_bias_table`` (signed, drawn symmetric around 0). V2: the
    table the position-bias MLP computes, ``attn.bias_table()`` = 16·σ(cpb_mlp(Δ̂)) at the
    log-spaced offsets Δ̂ (always in (0, 16), drawn on that range). Returns the arrays drawn
    ('index' (M², M²), 'bias' (M², M²), 'table' (2M-1, 2M-1)), 'clim' (the colour range) and
    'kind' ('learned', 'mlp' or 'none').
    """
    blk = _block(model, block)
    _check_head(blk, head)
    attn = blk.attn
    v2 = isinstance(attn, WindowAttentionV2)
    M = attn.window_size
    index = attn.relative_position_index
    fig = _figure(16, 5.2)
    axes = fig.subplots(1, 3)
    im0 = axes[0].imshow(index.numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im0, ax=axes[0], fraction=0.046)
    axes[0].set_title(
        f"relative_position_index ({M * M}×{M * M})\nrow into the (2M-1)² = {(2 * M - 1) ** 2}-row table", fontsize=10
    )
    out: dict[str, Any] = {"index": np.asarray(im0.get_array()), "kind": "none"}
    if v2 or attn.use_rpb:
        with torch.no_grad():
            bias = attn.relative_position_bias()[head].detach().float().cpu()
            if v2:
                # The MLP's output at every offset: the table B is gathered from (V2 has no learned table).
                table = attn.bias_table()[:, head].detach().float().cpu().view(2 * M - 1, 2 * M - 1)
            else:
                table = attn.relative_position_bias_table[:, head].detach().float().cpu().view(2 * M - 1, 2 * M - 1)
        if v2:
            # 16·σ(·) is bounded in (0, 16): a fixed range keeps pictures of heads and checkpoints comparable.
            cmap, lim = "magma", (0.0, CPB_BIAS_SCALE)
            bias_title = f"B = relative_position_bias()[{head}] = 16·σ(cpb_mlp(Δ̂)) ({M * M}×{M * M}), range 0..16"
            # On the fixed range a barely trained MLP (≈8 everywhere) looks flat: say what it spans.
            table_title = (
                f"bias_table()[:, {head}] = 16·σ(cpb_mlp(log-spaced Δ̂)), "
                f"values {float(table.min()):.2f}..{float(table.max()):.2f}\n"
                f"as a {2 * M - 1}×{2 * M - 1} grid of offsets (computed by the MLP, not learned)"
            )
        else:
            m = float(bias.abs().max()) or 1.0
            cmap, lim = "RdBu_r", (-m, m)
            bias_title = f"B = relative_position_bias()[{head}] ({M * M}×{M * M})"
            table_title = f"the same head's learned table as a {2 * M - 1}×{2 * M - 1} grid of offsets"
        im1 = axes[1].imshow(bias.numpy(), cmap=cmap, vmin=lim[0], vmax=lim[1], interpolation="nearest")
        fig.colorbar(im1, ax=axes[1], fraction=0.046)
        axes[1].set_title(bias_title, fontsize=10)
        im2 = axes[2].imshow(
            table.numpy(),
            cmap=cmap,
            vmin=lim[0],
            vmax=lim[1],
            interpolation="nearest",
            extent=(-(M - 1) - 0.5, M - 1 + 0.5, M - 1 + 0.5, -(M - 1) - 0.5),
        )
        fig.colorbar(im2, ax=axes[2], fraction=0.046)
        axes[2].set_xlabel("Δx (query − key)")
        axes[2].set_ylabel("Δy (query − key)")
        axes[2].set_title(table_title, fontsize=10)
        out.update(
            bias=np.asarray(im1.get_array()),
            table=np.asarray(im2.get_array()),
            clim=lim,
            kind="mlp" if v2 else "learned",
        )
    else:
        for ax in axes[1:]:
            ax.axis("off")
        axes[1].text(0.5, 0.5, "MODEL.SWIN.RPB is off: no bias", ha="center", va="center")
    for ax in axes[:2]:
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
    what = (
        "Continuous position bias (Swin V2 Eq. 3–4: log-spaced offsets → MLP → 16·σ)"
        if v2
        else "Relative position bias (Swin paper Eq. 4)"
    )
    fig.suptitle(f"{what}, block {block[0]}.{block[1]}, M={M}, head {head}, weights: {weights}", fontsize=11)
    _save(fig, path)
    return out


def _query_windows(query: tuple[int, int], padded_hw: tuple[int, int], M: int, shift: int) -> tuple[int, int]:
    """(window, token) of a map position after the block's shift + partition (found by running it)."""
    Hp, Wp = padded_hw
    idx = torch.arange(Hp * Wp, dtype=torch.float32).view(1, Hp, Wp, 1)
    windows = shift_partition(idx, shift, M).view(-1, M * M)
    w, n = torch.nonzero(windows == query[0] * Wp + query[1], as_tuple=True)
    return int(w[0]), int(n[0])


def attention_heatmap(
    block_maps: dict[str, Any], head: int, query: tuple[int, int], image_index: int = 0, window_only: bool = False
) -> np.ndarray:
    """The attention of one query token over the keys of its window, placed on the (unpadded) map:
    the row of the map is put back through the window reverse + unshift. With ``window_only`` the
    result is instead 1 on the tokens of the query's window (masked keys included), 0 elsewhere."""
    maps = block_maps["maps"]
    M, s = block_maps["window_size"], block_maps["shift_size"]
    Hp, Wp = block_maps["padded_hw"]
    H, W = block_maps["hw"]
    n_windows = (Hp // M) * (Wp // M)
    w, n = _query_windows(query, (Hp, Wp), M, s)
    windows = torch.zeros(n_windows, M, M, 1)
    windows[w] = 1.0 if window_only else maps[image_index * n_windows + w, head, n].view(M, M, 1)
    heat = reverse_unshift(windows, s, M, Hp, Wp)[0, :H, :W, 0]
    return heat.numpy()


def default_queries(hw: tuple[int, int]) -> list[tuple[int, int]]:
    H, W = hw
    qs = [(H // 2, W // 2), (H // 4, W // 4), (H // 4, (3 * W) // 4), (H - 1, W - 1)]
    out: list[tuple[int, int]] = []
    for q in qs:
        if q not in out:
            out.append(q)
    return out


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised tensor → (H, W, 3) in [0, 1]."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_attention(
    model: SwinTransformer,
    image: torch.Tensor,
    path: str,
    block: BlockId,
    head: int = 0,
    queries: Sequence[tuple[int, int]] | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Attention maps of ``block``/``head`` for a few query tokens, upsampled on top of ``image``
    (3, H, W, already preprocessed), plus the full N×N map of the first query's window.

    The maps are the walk's (V1: softmax(q·kᵀ·scale + B + mask); V2: softmax(cos(q, k)·1/τ + B +
    mask)), checked there to reproduce the attention module's output.

    Returns 'heatmaps' (one (H_tokens, W_tokens) array per query), 'queries', 'window_map' (the
    (M², M²) maps of window 'window', the first query's, image 0) and 'prediction' (class
    index, probability)."""
    blk = _block(model, block)
    _check_head(blk, head)
    result = trace(model, image.unsqueeze(0), keep_maps=[block])
    bm = result.maps[block]
    H, W = bm["hw"]
    M, s = bm["window_size"], bm["shift_size"]
    Hp, Wp = bm["padded_hw"]
    queries = list(queries) if queries else default_queries((H, W))
    for q in queries:
        if not (0 <= q[0] < H and 0 <= q[1] < W):
            raise UserError(f"query token {q[0]},{q[1]} is outside the {H}×{W} map of block {block[0]}.{block[1]}")
    probs = result.logits.float().softmax(-1)[0]
    p, c = (float(v) for v in probs.max(0))
    cls = int(c)
    cls_name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
    img = denormalize(image)
    ih, iw = img.shape[:2]
    sy, sx = ih / H, iw / W  # pixels per token of this stage
    extent = (0, W * sx, H * sy, 0)
    heatmaps = [attention_heatmap(bm, head, q) for q in queries]
    w0, _ = _query_windows(queries[0], (Hp, Wp), M, s)
    window_map = bm["maps"][w0, head].numpy()

    n_panels = 2 + len(queries)
    cols = 3
    rows = math.ceil(n_panels / cols)
    fig = _figure(4.2 * cols, 4.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.axis("off")

    def window_lines(ax) -> None:
        for b in range(0, Hp + 1, M):
            pos = (b + s) % Hp if s else b
            if pos <= H:
                ax.axhline(pos * sy, color="white", lw=0.8, ls="--", alpha=0.8)
        for b in range(0, Wp + 1, M):
            pos = (b + s) % Wp if s else b
            if pos <= W:
                ax.axvline(pos * sx, color="white", lw=0.8, ls="--", alpha=0.8)

    axes[0].imshow(img, extent=extent)
    window_lines(axes[0])
    axes[0].set_title(
        f"input {ih}×{iw}; block {block[0]}.{block[1]} windows\n({H}×{W} tokens, M={M}, shift {s})", fontsize=9
    )
    for i, (q, heat) in enumerate(zip(queries, heatmaps, strict=True)):
        ax = axes[1 + i]
        ax.imshow(img.mean(axis=2), cmap="gray", extent=extent)
        inside = attention_heatmap(bm, head, q, window_only=True) > 0
        blocked = inside & (heat < 1e-20)  # keys the shift mask hides from this query
        ax.imshow(
            np.ma.masked_where(~inside | blocked, heat),
            cmap="inferno",
            alpha=0.7,
            extent=extent,
            interpolation="nearest",
            vmin=0,
            vmax=float(heat.max()) or 1.0,
        )
        if blocked.any():
            from matplotlib.colors import ListedColormap

            ax.imshow(
                np.ma.masked_where(~blocked, blocked.astype(float)),
                cmap=ListedColormap(["#3b6cff"]),
                alpha=0.55,
                extent=extent,
                interpolation="nearest",
            )
        window_lines(ax)
        ax.add_patch(_rect(q[1] * sx, q[0] * sy, sx, sy))
        ax.set_title(
            f"query token ({q[0]}, {q[1]}): attention over its window\n"
            f"max {heat.max():.2f}" + (", blue = masked keys" if blocked.any() else ""),
            fontsize=9,
        )
    ax = axes[1 + len(queries)]
    im = ax.imshow(window_map, cmap="inferno", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"all {M * M}×{M * M} maps of the first query's window #{w0}", fontsize=9)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    for a in axes[: 1 + len(queries)]:
        a.set_xticks([])
        a.set_yticks([])
    kind = "SW-MSA" if s else "W-MSA"
    if bm["cosine"]:
        kind += f", scaled cosine attention, 1/τ = {float(bm['logit_scales'][head]):.3g}"
    fig.suptitle(
        f"{title + ': ' if title else ''}attention of block {block[0]}.{block[1]} ({kind}), head {head}; "
        f"predicted {cls_name} ({100 * p:.1f}%)",
        fontsize=11,
    )
    _save(fig, path)
    return {"heatmaps": heatmaps, "queries": queries, "window_map": window_map, "window": w0, "prediction": (cls, p)}


def _rect(x: float, y: float, w: float, h: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor="cyan", lw=2)
