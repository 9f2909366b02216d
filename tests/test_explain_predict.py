"""scripts/explain.py, scripts/predict.py and scripts/plot_logs.py.

The walk is checked against the shapes of the paper's Swin-T at 224 and against a padded input,
where only the running model knows the numbers; the figure functions return the arrays they
drew, which must be the model's own (mask, relative position index, bias). One short training
run of the digits demo (session fixture, slow) gives a real checkpoint and log for predict,
plot_logs and the attention picture; predict's accuracy must equal ``main.py --eval``'s. A tiny
Swin V2 model checks the V2 walk (post-norm order, cosine attention maps against the formula
spelled out from the module's parameters, the MLP's bias table) and, saved as a checkpoint,
explain, predict and export on it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_main, threads_env

from config import get_config
from errors import UserError
from models.swin_transformer import UNDERFLOW_MASK_VALUE, SwinTransformer, shift_attention_mask
from models.swin_transformer_v2 import SwinTransformerV2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import explain  # noqa: E402
import plot_logs  # noqa: E402
import predict  # noqa: E402

TINY_CFG = os.path.join(ROOT, "configs", "swin_tiny.yaml")
DEMO_CFG = os.path.join(ROOT, "configs", "demo", "swin_demo_digits.yaml")
ACC_LINE = re.compile(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) images (\d+)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Shortest schedule measured to clear 90 % val accuracy with a margin on the digits demo (see
# trained_demo): batch 16 at the demo's 5e-4 effective lr (BASE_LR is per 512 images), no drop path.
DEMO_TRAIN_OPTS = [
    "TRAIN.EPOCHS",
    "6",
    "TRAIN.WARMUP_EPOCHS",
    "1",
    "DATA.NUM_WORKERS",
    "0",
    "DATA.BATCH_SIZE",
    "16",
    "TRAIN.BASE_LR",
    "1.6e-2",
    "MODEL.DROP_PATH_RATE",
    "0.0",
    "SAVE_FREQ",
    "100",
]
# One thread count for every run of the session, so a run's numbers repeat (training-time and --eval
# figures compared): this process's cores (both, or one under `make test`'s two workers).
THREADS = threads_env()


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return os.path.getsize(path) > 1000 and f.read(8) == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swin_t():
    """Swin-T at 224 (random weights) and its walk of one image."""
    config = get_config(TINY_CFG)
    model, config = explain.build_for_walk(config, 224)
    result = explain.trace(model, torch.randn(1, 3, 224, 224))
    return model, result


def test_walk_of_swin_t_224_shows_the_papers_shapes(swin_t):
    _, result = swin_t
    r = result.find
    assert r("patch_embed").shape_in == (1, 3, 224, 224)
    assert r("patch_embed").shape_out == (1, 56, 56, 96)  # 3,136 tokens of 96 channels
    blk = r("block", 1, 1)
    assert (blk.info["window_size"], blk.info["shift_size"], blk.info["num_windows"]) == (7, 0, 64)
    assert r("block", 1, 2).info["shift_size"] == 3
    assert r("window_partition", 1, 1).shape_out == (64, 49, 96)
    assert r("qkv", 1, 1).info["linear_out"] == (64, 49, 288)
    assert r("qkv", 1, 1).shape_out == (3, 64, 3, 49, 32)
    assert r("attention", 1, 1).shape_out == (64, 3, 49, 49)
    assert r("attention", 1, 1).info["mask_shape"] is None
    assert r("attention", 1, 2).info["mask_shape"] == (64, 49, 49)
    assert r("window_reverse", 1, 1).shape_out == (1, 56, 56, 96)
    merge = r("patch_merging", 1)
    assert (merge.shape_in, merge.shape_out) == ((1, 56, 56, 96), (1, 28, 28, 192))  # 3,136 → 784 tokens
    # Stage 4's 7×7 map is one window and never shifts (the release's rule).
    assert [
        (b.info["num_windows"], b.info["shift_size"]) for b in result.records if b.step == "block" and b.stage == 4
    ] == [(1, 0), (1, 0)]
    assert [len([b for b in result.records if b.step == "block" and b.stage == s]) for s in (1, 2, 3, 4)] == [
        2,
        2,
        6,
        2,
    ]


def test_walk_attention_maps_reproduce_every_blocks_output(swin_t):
    _, result = swin_t
    checks = [rec.info["check_max_abs_diff"] for rec in result.records if rec.step == "attention"]
    assert len(checks) == 12
    assert max(checks) < 1e-4


def test_walk_costs_are_the_models_own_counts(swin_t):
    model, result = swin_t
    total = result.find("total").info
    assert total["params"] == sum(p.numel() for p in model.parameters()) == 28_288_354
    assert total["macs"] == model.flops() and 4.4e9 < total["macs"] < 4.6e9  # the paper's 4.5G
    stages = [rec.info for rec in result.records if rec.step == "stage_cost"]
    assert [s["params"] for s in stages] == [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    assert [s["macs"] for s in stages] == [
        model.layers[0].flops(56, 56),
        model.layers[1].flops(28, 28),
        model.layers[2].flops(14, 14),
        model.layers[3].flops(7, 7),
    ]
    parts = result.find("patch_embed").info["macs"] + sum(s["macs"] for s in stages) + result.find("head").info["macs"]
    assert parts == total["macs"]
    assert (
        result.find("patch_embed").info["params"]
        + sum(s["params"] for s in stages)
        + result.find("head").info["params"]
        == total["params"]
    )


def test_printed_walk_of_swin_t_names_the_numbers(swin_t):
    _, result = swin_t
    text = explain.format_walk(result.records, "Swin-T")
    for expected in (
        "3,136 tokens of 96 channels",
        "64 windows of 7×7",
        "3×64×3×49×32",
        "64×3×49×49",
        "64×49×96 → 56×56×96",
        "56×56×96 → 28×28×192: 3,136 → 784 tokens (192 ch)",
        "params 28,288,354",
        "MACs 4.494 G",
    ):
        assert expected in text, expected


def test_walk_reads_padding_from_the_running_model():
    # 36 px / patch 2 = 18×18 tokens: the block pads to 20×20 for 4×4 windows; stage 3 (5×5) pads to
    # 8×8; stage 4 (3×3) is a single 3×3 window. None of this is in a formula of the walk.
    records = explain.walk(get_config(DEMO_CFG), img_size=36)
    find = lambda step, s, b=None: explain.find_record(records, step, s, b)  # noqa: E731
    part = find("window_partition", 1, 1)
    assert (part.shape_in, part.info["padded_hw"], part.shape_out) == ((1, 18, 18, 48), (20, 20), (25, 16, 48))
    assert find("block", 1, 1).info["num_windows"] == 25
    assert find("block", 1, 1).shape_out == (1, 18, 18, 48)
    assert find("window_reverse", 1, 2).shape_in == (25, 16, 48)
    assert find("window_reverse", 1, 2).shape_out == (1, 18, 18, 48)  # cropped back
    assert find("patch_merging", 1).shape_out == (1, 9, 9, 96)
    assert (find("block", 2, 1).info["num_windows"], find("block", 3, 1).info["num_windows"]) == (9, 4)
    assert find("window_partition", 3, 2).info["padded_hw"] == (8, 8)
    assert (find("block", 4, 1).info["window_size"], find("block", 4, 2).info["shift_size"]) == (3, 0)
    assert find("attention", 4, 1).shape_out == (1, 16, 9, 9)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------
def test_mask_picture_draws_the_models_own_mask(swin_t, tmp_path):
    model, _ = swin_t
    drawn = explain.plot_cyclic_shift_mask(model, str(tmp_path / "mask.png"))
    g = drawn["geometry"]
    assert (g.height, g.width, g.window_size, g.shift_size) == (14, 14, 7, 3)
    assert g.block is model.layers[0].blocks[1]
    assert np.array_equal(drawn["mask"], g.block.attention_mask(14, 14, torch.device("cpu")).numpy())
    assert np.array_equal(drawn["mask"], shift_attention_mask(14, 14, 7, 3, UNDERFLOW_MASK_VALUE).numpy())
    assert drawn["mask"].shape == (4, 49, 49) and set(np.unique(drawn["mask"])) == {0.0, UNDERFLOW_MASK_VALUE}
    assert drawn["labels_agree"]  # "came from different regions" is exactly "masked"
    assert len(np.unique(drawn["labels_before"])) == 9
    assert _is_png(str(tmp_path / "mask.png"))


def test_demo_pictures_use_the_stage_1_map(tmp_path):
    model, _ = explain.build_for_walk(get_config(DEMO_CFG))
    drawn = explain.plot_cyclic_shift_mask(model, str(tmp_path / "mask.png"))
    assert "stage-1 feature map 16×16" in drawn["geometry"].note
    assert np.array_equal(drawn["mask"], model.layers[0].blocks[1].attention_mask(16, 16, torch.device("cpu")).numpy())
    windows = explain.plot_windows(model, str(tmp_path / "windows.png"))
    assert len(np.unique(windows["regular"])) == 16  # 16×16 map in 4×4 windows
    assert int(windows["cyclic"].max()) + 1 == 16 and int(windows["shifted"].max()) + 1 == 25
    assert _is_png(str(tmp_path / "windows.png"))


def test_large_windows_are_drawn_on_an_8x8_map_with_m4(tmp_path):
    model = SwinTransformer(
        img_size=96, patch_size=4, embed_dim=8, depths=[2], num_heads=[1], window_size=12, num_classes=2
    )
    drawn = explain.plot_cyclic_shift_mask(model, str(tmp_path / "mask.png"))
    assert "8×8 map with M=4" in drawn["geometry"].note
    assert np.array_equal(drawn["mask"], shift_attention_mask(8, 8, 4, 2, UNDERFLOW_MASK_VALUE).numpy())


def test_relative_position_picture_draws_the_models_index_and_bias(swin_t, tmp_path):
    model, _ = swin_t
    drawn = explain.plot_relative_position(model, str(tmp_path / "rp.png"), block=(1, 2), head=2)
    attn = model.layers[0].blocks[1].attn
    assert np.array_equal(drawn["index"], attn.relative_position_index.numpy())
    assert np.array_equal(drawn["bias"], attn.relative_position_bias()[2].detach().numpy())
    assert drawn["index"].shape == (49, 49) and drawn["table"].shape == (13, 13)
    assert _is_png(str(tmp_path / "rp.png"))
    with pytest.raises(UserError, match="--head 3 does not exist"):
        explain.plot_relative_position(model, str(tmp_path / "x.png"), block=(1, 1), head=3)


def test_explain_cli_prints_walk_and_picture_paths(tmp_path, capsys):
    assert explain.main(["--cfg", DEMO_CFG, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "16×16 = 256 tokens of 48 channels" in out and "16 windows of 4×4" in out
    for name in ("windows.png", "cyclic_shift_mask.png", "relative_position.png"):
        assert f"wrote {tmp_path / name}" in out and _is_png(str(tmp_path / name))
    assert explain.main(["--cfg", DEMO_CFG, "--image", "x.png", "--no-pictures"]) == 2
    assert "pass --resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# predict: inputs and class names
# ---------------------------------------------------------------------------------------------
def test_find_images_searches_folders_recursively_and_skips_other_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for p in ("a/1.png", "a/b/2.JPG", "a/b/notes.txt", ".hidden/3.png", "top.jpeg"):
        (tmp_path / p).write_bytes(b"x")
    found = predict.find_images([str(tmp_path)])
    assert [os.path.relpath(p, tmp_path) for p in found] == ["top.jpeg", "a/1.png", "a/b/2.JPG"]
    with pytest.raises(UserError, match="does not exist"):
        predict.find_images([str(tmp_path / "missing.png")])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no image")
    with pytest.raises(UserError, match="holds no images"):
        predict.find_images([str(tmp_path / "docs")])


def test_predict_cli_bad_path_is_one_line_error_exit_2(tmp_path, capsys):
    assert predict.main(["--resume", str(tmp_path / "no.pth"), str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.png does not exist" in err and "\n" not in err
    (tmp_path / "img.png").write_bytes(b"x")
    assert predict.main(["--resume", str(tmp_path / "no.pth"), str(tmp_path / "img.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no.pth does not exist" in err and "\n" not in err


def test_class_names_checkpoint_then_imagenet_then_indices():
    from data.class_names import resolve_class_names

    assert resolve_class_names({"class_names": ["cat", "dog"]}, 2) == ["cat", "dog"]
    names = resolve_class_names({}, 1000)
    assert len(names) == 1000 and names[0].startswith("tench") and names[999].startswith("toilet tissue")
    assert resolve_class_names({"class_names": ["a"]}, 3) == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------
# plot_logs without a run
# ---------------------------------------------------------------------------------------------
LOG = """\
[2026-01-01 00:00:01 swin] (engine.py 190): INFO Train: [0/2][0/3]\teta 0:00:01 lr 0.000100\t wd 0.0500\ttime 1.0 (1.0)\tloss 2.3000 (2.3000)\tgrad_norm 4.0000 (4.0000)\tloss_scale 1.0\timg/s 1.0\tmem 1MB
[2026-01-01 00:00:02 swin] (engine.py 190): INFO Train: [0/2][2/3]\teta 0:00:01 lr 0.000200\t wd 0.0500\ttime 1.0 (1.0)\tloss 2.1000 (2.2000)\tgrad_norm 3.0000 (3.5000)\tloss_scale 1.0\timg/s 1.0\tmem 1MB
[2026-01-01 00:00:03 swin] (engine.py 238): INFO  * Acc@1 40.000 Acc@5 90.000 loss 1.9000 images 10
[2026-01-01 00:00:04 swin] (engine.py 190): INFO Train: [1/2][2/3]\teta 0:00:01 lr 1.5e-05\t wd 0.0500\ttime 1.0 (1.0)\tloss 1.5000 (1.6000)\tgrad_norm nan (3.0000)\tloss_scale 1.0\timg/s 1.0\tmem 1MB
[2026-01-01 00:00:05 swin] (engine.py 238): INFO  * Acc@1 70.000 Acc@5 100.000 loss 1.2000 images 10
[2026-01-01 00:00:09 swin] (engine.py 238): INFO  * Acc@1 40.000 Acc@5 90.000 loss 1.9000 images 10
"""  # noqa: E501 - real log lines, which are this long; the last one is an --eval run of best.pth in the same log


def test_plot_logs_falls_back_to_the_log_file(tmp_path, capsys):
    (tmp_path / "log_rank0.txt").write_text(LOG)
    scalars, source = plot_logs.read_scalars(str(tmp_path))
    assert source.endswith("log_rank0.txt")
    assert scalars["train/loss"] == [(1.0, 2.3), (3.0, 2.1), (6.0, 1.5)]
    assert scalars["train/lr"] == [(1.0, 1e-4), (3.0, 2e-4), (6.0, 1.5e-5)]
    assert scalars["train/grad_norm"][:2] == [(1.0, 4.0), (3.0, 3.0)] and np.isnan(scalars["train/grad_norm"][2][1])
    assert scalars["val/acc1"] == [(0.0, 40.0), (1.0, 70.0)] and scalars["val/acc5"] == [(0.0, 90.0), (1.0, 100.0)]
    assert plot_logs.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert _is_png(str(tmp_path / "curves.png"))
    assert plot_logs.main([str(tmp_path / "nothing")]) == 2


# ---------------------------------------------------------------------------------------------
# Swin V2: the walk, the pictures, and a V2 checkpoint through explain, predict and export
# ---------------------------------------------------------------------------------------------
V2_OPTS = [
    "MODEL.TYPE",
    "swinv2",
    "MODEL.NAME",
    "swinv2_test",
    "MODEL.SWINV2.EMBED_DIM",
    "16",
    "MODEL.SWINV2.DEPTHS",
    "[2,2,2,2]",
    "MODEL.SWINV2.NUM_HEADS",
    "[1,2,4,8]",
    "MODEL.SWINV2.WINDOW_SIZE",
    "4",
    "MODEL.SWINV2.PATCH_SIZE",
    "2",
    "DATA.IMG_SIZE",
    "32",
    "MODEL.NUM_CLASSES",
    "3",
]
V2_CLASSES = ["cat", "dog", "fox"]
# The V2 blocks the tests look at: 16×16 map with a shift (1 head), 8×8 with a shift (2 heads),
# and stage 3's single 4×4 window (4 heads, no mask).
V2_BLOCKS = [(1, 2), (2, 2), (3, 1)]


def _v2_weights_that_matter(model: SwinTransformerV2, seed: int = 1) -> None:
    """Weights under which a V2 walk that is only approximately right would show.

    The release zero-initialises both post-norms (every block would be the identity: random ones
    here); 1/τ spreads per head from 2 to 300, past the clamp at 100 (5 for one-head stages); the
    position-bias MLP's output layer is scaled up so B spreads over ~5..11 instead of ~8 ± 0.1;
    q_bias and v_bias are non-zero (the key has none).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for blk in layer.blocks:
                for norm in (blk.norm1, blk.norm2):
                    norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
                    norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=g))
                attn = blk.attn
                h = attn.num_heads
                inv_tau = torch.linspace(2.0, 300.0, h) if h > 1 else torch.tensor([5.0])
                attn.logit_scale.copy_(inv_tau.log().view(h, 1, 1))
                attn.cpb_mlp[2].weight.mul_(40.0)
                attn.q_bias.copy_(0.5 * torch.randn(attn.q_bias.shape, generator=g))
                attn.v_bias.copy_(0.5 * torch.randn(attn.v_bias.shape, generator=g))


def _v2_probs_from_parameters(attn, x: torch.Tensor, mask) -> torch.Tensor:
    """softmax(cos(q, k)·1/τ + B + mask) of a ``WindowAttentionV2``, spelled out from its parameters.

    x: (B·nW, N, C) windows the module was given; mask: (nW, N, N) or None. Returns
    (B·nW, heads, N, N). Nothing here calls the module or the walk: q and k from ``qkv.weight`` and
    ``q_bias`` (no key bias), 1/τ = exp(min(logit_scale, log 100)), B = 16·σ(MLP) of the
    log-spaced offsets (Linear → ReLU → Linear by hand) gathered by (Δy, Δx) of each token pair.
    """
    B_, N, C = x.shape
    h, M = attn.num_heads, attn.window_size
    d = C // h
    w = attn.qkv.weight.detach()
    q = (x @ w[:C].T + attn.q_bias.detach()).view(B_, N, h, d).transpose(1, 2)
    k = (x @ w[C : 2 * C].T).view(B_, N, h, d).transpose(1, 2)
    cos = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-2, -1)
    inv_tau = attn.logit_scale.detach().view(h, 1, 1).clamp(max=math.log(100.0)).exp()
    # Offsets Δ ∈ [-(M-1), M-1]², scaled to [-8, 8], then sign·log2(1 + |Δ|)/log2(8) (V2 Eq. 4).
    delta = torch.arange(-(M - 1), M, dtype=torch.float32) / (M - 1) * 8.0
    dy, dx = torch.meshgrid(delta, delta, indexing="ij")
    coords = torch.stack([dy, dx], -1).reshape(-1, 2)
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / 3.0
    lin1, lin2 = attn.cpb_mlp[0], attn.cpb_mlp[2]
    table = 16.0 * torch.sigmoid(
        torch.relu(coords @ lin1.weight.detach().T + lin1.bias.detach()) @ lin2.weight.detach().T
    )
    ys, xs = torch.arange(N) // M, torch.arange(N) % M
    row = (ys[:, None] - ys[None, :] + M - 1) * (2 * M - 1) + (xs[:, None] - xs[None, :] + M - 1)  # N, N
    bias = table[row].permute(2, 0, 1)  # h, N, N
    logits = cos * inv_tau + bias
    if mask is not None:
        nW = mask.shape[0]
        logits = (logits.view(B_ // nW, nW, h, N, N) + mask[None, :, None]).view(B_, h, N, N)
    return logits.softmax(-1)


@pytest.fixture(scope="module")
def swin_v2():
    """A tiny V2 classifier (32 px, patch 2, window 4, depths 2,2,2,2) with weights that matter."""
    model, config = explain.build_for_walk(get_config(None, V2_OPTS))
    _v2_weights_that_matter(model)
    return model, config


def _capture_attention_inputs(model, blocks):
    """Forward pre-hooks that keep the windows and mask each listed block's attention receives."""
    seen, handles = {}, []
    for si, bi in blocks:

        def hook(module, args, kwargs, key=(si, bi)):
            seen[key] = (args[0].detach().clone(), kwargs.get("mask"))

        handles.append(model.layers[si - 1].blocks[bi - 1].attn.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def test_v2_walk_shows_post_norm_order_and_cosine_attention(swin_v2):
    model, _ = swin_v2
    result = explain.trace(model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    steps = [(r.step, r.info.get("branch")) for r in result.records if (r.stage, r.block) == (2, 2)]
    # Attention on the raw input, reversed, then norm1 (post-norm); the MLP branch, then norm2.
    assert steps == [
        ("block", None),
        ("window_partition", None),
        ("qkv", None),
        ("attention", None),
        ("window_reverse", None),
        ("post_norm", "attention"),
        ("post_norm", "mlp"),
    ]
    find = result.find
    assert find("block", 2, 2).info["norm"] == "post" and find("window_partition", 2, 2).info["source"].startswith(
        "block input"
    )
    assert find("window_partition", 2, 2).shape_in == (1, 8, 8, 32) and find("window_partition", 2, 2).shape_out == (
        4,
        16,
        32,
    )
    assert find("qkv", 2, 2).info["linear_out"] == (4, 16, 96) and find("qkv", 2, 2).shape_out == (3, 4, 2, 16, 16)
    att = find("attention", 2, 2).info
    assert att["cosine"] and att["mask_shape"] == (4, 16, 16) and "scale" not in att
    # 1/τ per head as the module computes it; the second head's 300 is clamped to 100.
    assert att["logit_scales"] == pytest.approx([2.0, 100.0], rel=1e-5)
    assert -1 - 1e-5 <= att["cosine_range"][0] < att["cosine_range"][1] <= 1 + 1e-5
    bias = model.layers[1].blocks[1].attn.relative_position_bias().detach()
    assert (
        att["bias_range"] == pytest.approx((float(bias.min()), float(bias.max())))
        and 0 < att["bias_range"][0] < att["bias_range"][1] < 16
    )
    assert find("window_reverse", 2, 2).shape_out == find("post_norm", 2, 2).shape_in == (1, 8, 8, 32)
    checks = [r.info["check_max_abs_diff"] for r in result.records if r.step == "attention"]
    assert len(checks) == 8 and max(checks) < 1e-5
    assert len([r for r in result.records if r.step == "post_norm"]) == 16
    assert find("patch_merging", 1).info["norm"] == "after reduction"
    assert find("total").info["params"] == sum(p.numel() for p in model.parameters())
    assert find("total").info["macs"] == model.flops()
    text = explain.format_walk(result.records, "V2")
    for expected in (
        "(un-normalised block input) → roll by (-2, -2), 4 windows of 4×4",
        "F.linear (bias q, 0, v) 4×16×32 → 4×16×96",
        "softmax(cos(q, k)·1/τ + B + mask), 1/τ per head [2, 100]",
        "norm1 = LayerNorm of the attention output 8×8×32",
        "x + drop_path(norm2(MLP(x))) on 8×8×32",
        "LayerNorm after the reduction (V2)",
    ):
        assert expected in text, expected
    # V1 keeps its pre-norm walk: no post-norm steps, the partition reads norm1's output.
    v1 = explain.walk(get_config(DEMO_CFG))
    assert not [r for r in v1 if r.step == "post_norm"]
    assert explain.find_record(v1, "window_partition", 1, 1).info["source"] == "norm1 output"


def test_v2_attention_maps_equal_cosine_softmax_from_the_parameters(swin_v2, tmp_path):
    model, _ = swin_v2
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen, handles = _capture_attention_inputs(model, V2_BLOCKS)
    try:
        result = explain.trace(model, image.unsqueeze(0), keep_maps=V2_BLOCKS)
    finally:
        for handle in handles:
            handle.remove()
    for block in V2_BLOCKS:
        attn = model.layers[block[0] - 1].blocks[block[1] - 1].attn
        x, mask = seen[block]
        expected = _v2_probs_from_parameters(attn, x, mask)
        kept = result.maps[block]
        assert kept["maps"].shape == expected.shape
        torch.testing.assert_close(kept["maps"], expected, atol=2e-6, rtol=1e-5)
        # The maps are sharp enough (1/τ up to 100, spread-out B) that a wrong scale or bias shows.
        assert float(expected.max()) > 0.5
        torch.testing.assert_close(kept["logit_scales"], attn.logit_scales().detach().view(-1))
    assert seen[(1, 2)][1] is not None and seen[(3, 1)][1] is None  # shifted and unshifted blocks covered
    # The picture draws those same maps: the first query's window, and each query's row.
    drawn = explain.plot_attention(
        model, image, str(tmp_path / "a.png"), block=(2, 2), head=1, queries=[(1, 1), (6, 6)]
    )
    attn = model.layers[1].blocks[1].attn
    expected = _v2_probs_from_parameters(attn, *seen[(2, 2)])
    np.testing.assert_allclose(drawn["window_map"], expected[drawn["window"], 1].numpy(), atol=2e-6)
    assert all(h.shape == (8, 8) and abs(h.sum() - 1) < 1e-5 for h in drawn["heatmaps"])
    assert _is_png(str(tmp_path / "a.png"))


def test_v2_relative_position_picture_draws_the_mlp_table(swin_v2, tmp_path):
    model, _ = swin_v2
    drawn = explain.plot_relative_position(model, str(tmp_path / "rp.png"), block=(2, 2), head=1)
    attn = model.layers[1].blocks[1].attn
    assert drawn["kind"] == "mlp" and drawn["clim"] == (0.0, 16.0)
    assert np.array_equal(drawn["index"], attn.relative_position_index.numpy())
    with torch.no_grad():
        table = 16.0 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table))[:, 1]
        bias = attn.relative_position_bias()[1]
    np.testing.assert_allclose(drawn["table"], table.view(7, 7).numpy(), rtol=1e-6)
    np.testing.assert_allclose(drawn["bias"], bias.numpy(), rtol=1e-6)
    assert 0 < drawn["table"].min() and drawn["table"].max() < 16 and drawn["table"].max() - drawn["table"].min() > 1
    assert _is_png(str(tmp_path / "rp.png"))
    # Window ids and the shift mask come from the V2 model's own block.
    mask = explain.plot_cyclic_shift_mask(model, str(tmp_path / "mask.png"))
    assert mask["geometry"].block is model.layers[0].blocks[1] and mask["labels_agree"]
    assert np.array_equal(mask["mask"], shift_attention_mask(16, 16, 4, 2).numpy())


@pytest.fixture(scope="module")
def v2_checkpoint(swin_v2, tmp_path_factory):
    """The tiny V2 model saved as main.py saves a checkpoint (weights, config YAML, class names),
    and one 40×40 RGB image."""
    from PIL import Image

    from checkpoint import config_yaml, save_checkpoint

    model, config = swin_v2
    folder = tmp_path_factory.mktemp("v2_ckpt")
    path = str(folder / "last.pth")
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "epoch": 0,
            "step": 0,
            "max_accuracy": 0.0,
            "config": config_yaml(config),
            "class_names": list(V2_CLASSES),
        },
    )
    image = str(folder / "img.png")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    return {"ckpt": path, "image": image, "model": model, "config": config}


def test_v2_checkpoint_explain_cli_walks_and_draws(v2_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "explain")
    assert (
        explain.main(
            [
                "--resume",
                v2_checkpoint["ckpt"],
                "--image",
                v2_checkpoint["image"],
                "--block",
                "2.2",
                "--head",
                "1",
                "--out",
                out,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert (
        "16×16 = 256 tokens of 16 channels" in text
        and "softmax(cos(q, k)·1/τ + B + mask), 1/τ per head [2, 100]" in text
    )
    assert "norm1 = LayerNorm of the attention output" in text
    for name in ("windows.png", "cyclic_shift_mask.png", "relative_position.png", "attention.png"):
        assert f"wrote {os.path.join(out, name)}" in text and _is_png(os.path.join(out, name))
    # The walk ran the checkpoint's weights: its prediction is the saved model's.
    from data.build import build_transform
    from data.robust import load_rgb

    model, config = v2_checkpoint["model"], v2_checkpoint["config"]
    img = build_transform(False, config)(load_rgb(v2_checkpoint["image"]))
    with torch.no_grad():
        probs = model.eval()(img.unsqueeze(0)).softmax(-1)[0]
    p, c = (float(v) for v in probs.max(0))
    assert f"prediction for {v2_checkpoint['image']}: {V2_CLASSES[int(c)]} ({100 * p:.1f}%)" in text


def test_v2_checkpoint_predicts_and_exports(v2_checkpoint, tmp_path, capsys):
    import export

    from data.build import build_transform
    from data.robust import load_rgb

    model, config, names = predict.load_classifier(v2_checkpoint["ckpt"])
    assert isinstance(model, SwinTransformerV2) and config.MODEL.TYPE == "swinv2" and names == V2_CLASSES
    saved = v2_checkpoint["model"].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    image = v2_checkpoint["image"]
    transform = build_transform(False, config)
    top = predict.predict(model, transform, [image], names, topk=3)[0]["top"]
    with torch.no_grad():
        probs = v2_checkpoint["model"].eval()(transform(load_rgb(image)).unsqueeze(0)).softmax(-1)[0]
    assert [t["index"] for t in top] == probs.argsort(descending=True).tolist()
    assert [t["prob"] for t in top] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-6)
    assert [t["class"] for t in top] == [V2_CLASSES[t["index"]] for t in top]

    assert predict.main(["--resume", v2_checkpoint["ckpt"], image, "--json", "--topk", "2", "--device", "cpu"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert [t["index"] for t in cli[0]["top"]] == [t["index"] for t in top[:2]]
    # --compile: the inference path of --eval --compile (aot_eager here: Inductor takes minutes on 2 cores).
    argv = ["--resume", v2_checkpoint["ckpt"], image, "--json", "--topk", "2", "--device", "cpu", "--compile"]
    assert predict.main([*argv, "--opts", "TRAIN.COMPILE_BACKEND", "aot_eager"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert [t["index"] for t in compiled[0]["top"]] == [t["index"] for t in top[:2]]
    assert [t["prob"] for t in compiled[0]["top"]] == pytest.approx([t["prob"] for t in top[:2]], abs=0.02)

    out = str(tmp_path / "v2.safetensors")
    assert export.main([v2_checkpoint["ckpt"], "--out", out]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {len(saved)} tensors (official layout) to {out}"
    model2, config2, names2 = predict.load_classifier(out)
    assert isinstance(model2, SwinTransformerV2) and config2.MODEL.SWINV2.WINDOW_SIZE == 4 and names2 == V2_CLASSES
    assert all(torch.equal(v, saved[k]) for k, v in model2.state_dict().items())
    top2 = predict.predict(model2, build_transform(False, config2), [image], names2, topk=3)[0]["top"]
    assert top2 == top


def test_predict_names_and_skips_an_unreadable_image_among_others(v2_checkpoint, tmp_path, capsys):
    import shutil

    from data.build import build_transform

    folder = tmp_path / "images"
    folder.mkdir()
    good = [str(folder / "a.png"), str(folder / "c.png")]
    for path in good:
        shutil.copy(v2_checkpoint["image"], path)
    bad = str(folder / "b.png")
    with open(bad, "wb") as f:
        f.write(np.random.default_rng(0).bytes(2000))

    model, config, names = predict.load_classifier(v2_checkpoint["ckpt"])
    transform = build_transform(False, config)
    # Never replaced by a neighbour: the readable images get exactly their own predictions.
    results = predict.predict(model, transform, [good[0], bad, good[1]], names, topk=2)
    assert results == predict.predict(model, transform, good, names, topk=2)

    argv = ["--resume", v2_checkpoint["ckpt"], str(folder), "--json", "--device", "cpu"]
    assert predict.main(argv) == 0
    out = capsys.readouterr()
    assert [r["path"] for r in json.loads(out.out)] == good
    assert out.err.startswith(f"warning: cannot read image {bad} (") and out.err.rstrip().endswith("; skipped")


def test_predict_on_unreadable_images_only_is_a_one_line_error_exit_2(v2_checkpoint, tmp_path, capsys):
    bad = [str(tmp_path / "x.png"), str(tmp_path / "y.png")]
    for path in bad:
        with open(path, "wb") as f:
            f.write(b"not an image")
    assert predict.main(["--resume", v2_checkpoint["ckpt"], bad[0], "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"error: cannot read image {bad[0]} (") and out.err.count("\n") == 1
    assert predict.main(["--resume", v2_checkpoint["ckpt"], *bad, "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert out.err == f"error: none of the 2 images can be read: {bad[0]}, {bad[1]}; check the files\n"


# ---------------------------------------------------------------------------------------------
# With a trained demo checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_demo(demo_data, tmp_path_factory):
    """The digits demo trained for the shortest schedule that clears 90 % val accuracy.

    Final val Acc@1 measured (one thread, warmup 1 epoch, no drop path): batch 64 at 2.5e-4 (the
    demo's schedule squeezed) 74 % after 4 of 6 epochs; batch 64 at 5e-4: 89.7 % after 8,
    93.9 % after 10; batch 32 at 5e-4: 86.1 % after 5 (1e-3: 85.0 %); batch 16 at 5e-4: 89.7 %
    after 4, 91.1 % after 5, 93.1 % after 6 (~20 s per epoch on an idle core). Six epochs of
    batch 16 keep a margin over 90 %. Trained on this process's cores (both when the suite runs
    alone, one under `make test`'s two workers): on a 2-core Xeon in fp32, 92.8 % in 2 min 15 s on
    one thread, 91.4 % in 1 min 39 s on two.
    The figure moves with the CPU's kernels, precision and thread count, so tests ask for 85 %.
    """
    out = tmp_path_factory.mktemp("demo_run")
    proc = run_main(
        ["--cfg", DEMO_CFG, "--data-path", demo_data, "--output", str(out), "--opts", *DEMO_TRAIN_OPTS],
        env=THREADS,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run_dir = os.path.join(str(out), "swin_demo_digits", "default")
    accs = [float(m.group(1)) for m in ACC_LINE.finditer(proc.stdout + proc.stderr)]
    return {"data": demo_data, "run_dir": run_dir, "ckpt": os.path.join(run_dir, "last.pth"), "accs": accs}


@pytest.mark.slow
def test_predict_on_trained_demo_matches_eval_accuracy(trained_demo, tmp_path):
    val = os.path.join(trained_demo["data"], "val")
    model, config, names = predict.load_classifier(trained_demo["ckpt"], DEMO_CFG)
    assert config.MODEL.NUM_CLASSES == 10 and names == [str(d) for d in range(10)]
    from data.build import build_transform

    paths = predict.find_images([val])
    results = predict.predict(model, build_transform(False, config), paths, names, topk=5, batch_size=64)
    assert len(results) == len(paths) == 360
    for r in results:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert len({t["index"] for t in r["top"]}) == 5
    correct = sum(r["top"][0]["class"] == os.path.basename(os.path.dirname(r["path"])) for r in results)
    assert correct / len(results) >= 0.85

    proc = run_main(
        [
            "--cfg",
            DEMO_CFG,
            "--data-path",
            trained_demo["data"],
            "--output",
            str(tmp_path),
            "--eval",
            "--resume",
            trained_demo["ckpt"],
            "--opts",
            "DATA.NUM_WORKERS",
            "0",
        ],
        env=THREADS,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inference: the whole model compiled" not in proc.stdout  # eager unless --compile
    m = ACC_LINE.search(proc.stdout)
    acc1, count = float(m.group(1)), int(m.group(4))
    assert count == len(results)
    assert round(acc1 * count / 100) == correct
    assert acc1 == pytest.approx(trained_demo["accs"][-1])


@pytest.mark.slow
def test_predict_json_cli_names_classes_from_the_checkpoint(trained_demo, tmp_path):
    ckpt = torch.load(trained_demo["ckpt"], map_location="cpu", weights_only=True)
    ckpt["class_names"] = [f"digit-{d}" for d in range(10)]
    renamed = str(tmp_path / "renamed.pth")
    torch.save(ckpt, renamed)
    folder = os.path.join(trained_demo["data"], "val", "7")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "predict.py"),
            "--resume",
            renamed,
            folder,
            "--json",
            "--topk",
            "3",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **THREADS},
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == len(os.listdir(folder))
    assert all(r["path"].startswith(folder) and len(r["top"]) == 3 for r in results)
    assert {t["class"] for r in results for t in r["top"]} <= {f"digit-{d}" for d in range(10)}
    assert all(t["class"] == f"digit-{t['index']}" for r in results for t in r["top"])
    assert sum(r["top"][0]["class"] == "digit-7" for r in results) >= 0.8 * len(results)
    assert all(r["top"][0]["prob"] >= r["top"][1]["prob"] >= r["top"][2]["prob"] for r in results)


@pytest.mark.slow
def test_plot_logs_draws_the_short_runs_curves(trained_demo, tmp_path, capsys):
    scalars, source = plot_logs.read_scalars(trained_demo["run_dir"])
    assert source == "tensorboard"
    epochs = int(DEMO_TRAIN_OPTS[DEMO_TRAIN_OPTS.index("TRAIN.EPOCHS") + 1])
    assert [e for e, _ in scalars["val/acc1"]] == list(range(epochs))
    assert [a for _, a in scalars["val/acc1"]] == pytest.approx(trained_demo["accs"], abs=1e-3)
    assert len(scalars["train/loss"]) >= epochs and len(scalars["train/lr"]) == len(scalars["train/grad_norm"])
    out = str(tmp_path / "curves.png")
    assert plot_logs.main([trained_demo["run_dir"], "--out", out]) == 0
    assert capsys.readouterr().out.strip() == out
    assert _is_png(out)


@pytest.mark.slow
def test_explain_draws_attention_of_the_trained_demo(trained_demo, tmp_path, capsys):
    image = sorted(predict.find_images([os.path.join(trained_demo["data"], "val", "3")]))[0]
    out = str(tmp_path / "explain")
    assert (
        explain.main(
            ["--resume", trained_demo["ckpt"], "--image", image, "--block", "1.2", "--head", "1", "--out", out]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert f"wrote {os.path.join(out, 'attention.png')}" in text and _is_png(os.path.join(out, "attention.png"))
    assert "prediction for" in text and "16×16 = 256 tokens of 48 channels" in text

    model, config, names = predict.load_classifier(trained_demo["ckpt"])
    from data.build import build_transform
    from data.robust import load_rgb

    img = build_transform(False, config)(load_rgb(image))
    drawn = explain.plot_attention(model, img, str(tmp_path / "a.png"), block=(1, 2), head=1)
    # Each query's row of the softmax, put back on the 16×16 map, sums to one over its window.
    assert all(h.shape == (16, 16) and abs(h.sum() - 1) < 1e-5 for h in drawn["heatmaps"])
    assert all(int((h > 0).sum()) <= 16 for h in drawn["heatmaps"])
    top = predict.predict(model, build_transform(False, config), [image], names, topk=1)[0]["top"][0]
    assert drawn["prediction"][0] == top["index"] and drawn["prediction"][1] == pytest.approx(top["prob"], abs=1e-5)


@pytest.mark.slow
def test_compiled_bf16_inference_agrees_with_fp32_on_the_demo_val_set(trained_demo, monkeypatch):
    """The --compile inference path with bf16 weights (as on a CPU with native bf16): top-1 equal
    to the fp32 model's on at least 99 % of the 360 validation digits, logits within bf16 error.
    Inductor (with frozen weights) when SWIN_TEST_INDUCTOR=1, else aot_eager (the same numerics)."""
    from PIL import Image

    import inference
    from data.build import build_transform
    from distributed import Precision

    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    cpu = torch.device("cpu")
    model, config, _ = predict.load_classifier(trained_demo["ckpt"], DEMO_CFG)
    transform = build_transform(False, config)
    paths = predict.find_images([os.path.join(trained_demo["data"], "val")])
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        reference = model.eval()(images)
    backend = "inductor" if os.environ.get("SWIN_TEST_INDUCTOR") == "1" else "aot_eager"
    fast, precision = inference.inference_model(model, cpu, Precision(cpu, torch.bfloat16, "bf16"), True, backend)
    with torch.no_grad(), precision.autocast():
        out = fast(images)
    assert next(fast.parameters()).dtype == torch.bfloat16 and out.dtype == torch.float32
    agreement = (out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 0.99, agreement
    assert (out - reference).abs().max() / reference.abs().max() < 0.03


@pytest.mark.slow
def test_eval_with_compile_runs_the_compiled_inference_path_with_the_eager_accuracy(trained_demo, tmp_path):
    """The eager accuracy is the training run's last validation, which an eager --eval of the same
    checkpoint reproduces (test_predict_on_trained_demo_matches_eval_accuracy)."""
    args = ["--cfg", DEMO_CFG, "--data-path", trained_demo["data"], "--eval", "--resume", trained_demo["ckpt"]]
    args += ["--output", str(tmp_path), "--compile", "--opts", "DATA.NUM_WORKERS", "0"]
    compiled = run_main([*args, "TRAIN.COMPILE_BACKEND", "aot_eager"], env=THREADS)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert "inference: the whole model compiled (aot_eager" in compiled.stdout
    c_acc1, *_, c_n = ACC_LINE.search(compiled.stdout).groups()
    assert c_n == "360"
    # bf16 weights (where the CPU has native bf16) may move a digit or two, never more than 1 %.
    assert abs(float(c_acc1) - trained_demo["accs"][-1]) <= 1.0


def test_explain_refuses_an_unreadable_image_and_a_size_its_preprocessing_does_not_make_in_one_line(
    v2_checkpoint, tmp_path, capsys
):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert explain.main(["--resume", v2_checkpoint["ckpt"], "--image", str(bad), "--no-pictures"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read image {bad}" in err
    size = ["--img-size", "64", "--no-pictures"]
    assert explain.main(["--resume", v2_checkpoint["ckpt"], "--image", v2_checkpoint["image"], *size]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--img-size 64 differs from the 32x32" in err


def test_predict_and_explain_refuse_a_simmim_checkpoint_in_one_line(v2_checkpoint, tmp_path, capsys):
    from checkpoint import config_yaml
    from models import build_model

    simmim = get_config(os.path.join(ROOT, "configs", "demo", "simmim_demo_digits.yaml"))
    path = str(tmp_path / "simmim.pth")
    torch.save({"model": build_model(simmim).state_dict(), "config": config_yaml(simmim)}, path)
    for run in (
        lambda: predict.main(["--resume", path, v2_checkpoint["image"]]),
        lambda: explain.main(["--resume", path, "--no-pictures"]),
    ):
        assert run() == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a SimMIM pre-training model, with no classifier" in err
