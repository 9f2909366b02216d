"""Swin V2 (issue "Swin Transformer V2"): the release's configs, parameter counts and FLOPs, its
checkpoint layout, parity with timm's independent ``swinv2_*`` models (eval logits and training
gradients, windows 8 and 16, and a 192² window-12 checkpoint fine-tuned at 256² window 16), the
pieces of the paper one by one, any input size, the backbone API, fp16 numerics and bad input.

Everything runs on CPU. Parity tests move every parameter away from its initial value: the
release zero-initialises the res-post-norms, which would make every block the identity and hide
any bug inside it.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
from timm.models.swin_transformer_v2 import checkpoint_filter_fn  # noqa: E402

from config import get_config  # noqa: E402
from errors import UserError  # noqa: E402
from models import SwinTransformerV2, build_model, load_pretrained  # noqa: E402
from models.swin_transformer_v2 import (  # noqa: E402
    LOGIT_SCALE_MAX,
    PatchMergingV2,
    SwinTransformerBlockV2,
    WindowAttentionV2,
    log_spaced_relative_coords,
)
from models.windows import relative_position_index, shift_attention_mask, window_partition  # noqa: E402

V2 = ROOT / "configs" / "swinv2"

# The release's model table: (params in M as published, GMACs as published) and the exact count
# the released model code gives for 1,000 classes (equal to timm's swinv2 models).
RELEASE_TABLE = {
    "swinv2_tiny_patch4_window8_256.yaml": (28_347_154, 5.9),
    "swinv2_tiny_patch4_window16_256.yaml": (28_347_154, 6.6),
    "swinv2_small_patch4_window8_256.yaml": (49_728_418, 11.5),
    "swinv2_small_patch4_window16_256.yaml": (49_728_418, 12.6),
    "swinv2_base_patch4_window8_256.yaml": (87_918_816, 20.3),
    "swinv2_base_patch4_window16_256.yaml": (87_918_816, 21.8),
    "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml": (87_918_816, 21.8),
    "swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml": (87_918_816, 54.7),
    "swinv2_large_patch4_window12to16_192to256_22kto1k_ft.yaml": (196_739_932, 47.5),
    "swinv2_large_patch4_window12to24_192to384_22kto1k_ft.yaml": (196_739_932, 115.4),
    "swinv2_base_patch4_window12_192_22k.yaml": (87_918_816, None),
    "swinv2_large_patch4_window12_192_22k.yaml": (196_739_932, None),
}

# SwinV2-T's shape, for building variants of it by hand.
TINY_V2 = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.0)


def _config(cfg_file, *opts):
    return get_config(str(cfg_file) if cfg_file else None, ["MODEL.NUM_CLASSES", "1000", *opts])


def _randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter away from its initial value (post-norms away from 0, norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                p.copy_(math.log(10) + 1.5 * noise)  # some heads' 1/τ past the clamp at 100
            elif p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.add_(0.05 * noise)
    return model


def _timm_twin(model: SwinTransformerV2, name: str, state=None, **kwargs) -> torch.nn.Module:
    """timm's own model with ``model``'s weights (or ``state``), mapped by timm's checkpoint filter."""
    twin = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kwargs)
    result = twin.load_state_dict(checkpoint_filter_fn(state if state is not None else model.state_dict(), twin))
    assert not result.missing_keys and not result.unexpected_keys
    return twin


def _released_layout(model: SwinTransformerV2) -> dict:
    """The state dict as the release saves it: weights plus its persistent buffers, here filled
    with garbage, to prove they are rebuilt rather than loaded."""
    state = dict(model.state_dict())
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            M = blk.window_size
            state[f"layers.{i}.blocks.{j}.attn.relative_coords_table"] = torch.full((1, 2 * M - 1, 2 * M - 1, 2), 7.0)
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(M * M, M * M, dtype=torch.long)
            if blk.shift_size:
                state[f"layers.{i}.blocks.{j}.attn_mask"] = torch.ones(4, M * M, M * M)
    return state


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# Our parameter name → timm's: timm merges at the start of the next stage and names the head head.fc.
def _timm_name(name: str) -> str:
    import re

    name = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", name)
    return name.replace("head.", "head.fc.")


# ---------------------------------------------------------------------------------------------
# 1. The release's configs, parameter counts and FLOPs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RELEASE_TABLE))
def test_each_released_v2_config_loads_unchanged_and_builds_the_release_model(name):
    params, gmacs = RELEASE_TABLE[name]
    config = _config(V2 / name)
    assert config.MODEL.TYPE == "swinv2"
    with torch.device("meta"):
        model = build_model(config)
    assert isinstance(model, SwinTransformerV2)
    assert sum(p.numel() for p in model.parameters()) == params
    if gmacs is not None:
        assert abs(model.flops() / 1e9 - gmacs) < 0.06, model.flops() / 1e9


def test_twelve_v2_configs_ship_with_the_release_names():
    assert sorted(p.name for p in V2.glob("*.yaml")) == sorted(RELEASE_TABLE)


def test_fine_tune_configs_give_the_pretrained_windows_of_a_192_window_12_model():
    c = _config(V2 / "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml")
    assert list(c.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES) == [12, 12, 12, 6]
    with torch.device("meta"):
        model = build_model(c)
    # Stage 4 of a 256² model is 8×8 < 16: one whole-map window, unshifted, as released.
    last = model.layers[3].blocks
    assert [b.window_size for b in last] == [8, 8] and [b.shift_size for b in last] == [0, 0]
    assert [layer.blocks[0].attn.pretrained_window_size for layer in model.layers] == [12, 12, 12, 6]
    # Stage 3 (16×16) is exactly one window: no shift either (the release's rule is "≤ window").
    assert [layer.blocks[1].shift_size for layer in model.layers[:3]] == [8, 8, 0]
    assert [layer.blocks[0].window_size for layer in model.layers] == [16, 16, 16, 8]


# ---------------------------------------------------------------------------------------------
# 2. The paper's pieces, one by one
# ---------------------------------------------------------------------------------------------
def test_log_spaced_coordinates_follow_eq_4():
    table = log_spaced_relative_coords(8)  # no pretrained window: normalised by M - 1 = 7
    assert table.shape == (15 * 15, 2)
    # Row 0 is offset (-7, -7): -7/7·8 = -8 → -log2(9)/3; the centre row (0, 0) is 0.
    expected = -math.log2(9.0) / 3.0
    torch.testing.assert_close(table[0], torch.tensor([expected, expected]))
    assert torch.equal(table[7 * 15 + 7], torch.zeros(2))
    # With a pretrained window of 12, offset 11 maps where it did in pre-training (to ±1·log2(9)/3).
    fine = log_spaced_relative_coords(16, pretrained_window_size=12)
    row = (11 + 15) * 31 + 15  # dy = +11, dx = 0
    torch.testing.assert_close(fine[row], torch.tensor([math.log2(9.0) / 3.0, 0.0]))
    assert torch.equal(log_spaced_relative_coords(12)[(11 + 11) * 23 + 11], fine[row])


def test_cosine_attention_equals_the_formula_written_out():
    torch.manual_seed(0)
    attn = WindowAttentionV2(dim=12, window_size=4, num_heads=3, pretrained_window_size=0, attn_impl="reference")
    _randomise_(attn, seed=1)
    with torch.no_grad():
        attn.logit_scale[0] = 5.5  # past the clamp at log 100
    x = torch.randn(8, 16, 12)  # 2 images × 4 windows
    mask = shift_attention_mask(8, 8, 4, 2)
    out = attn(x, mask=mask)

    # Written out from the paper, independently of the module's helpers.
    qkv = x @ attn.qkv.weight.T + torch.cat([attn.q_bias, torch.zeros(12), attn.v_bias])
    q, k, v = qkv.view(8, 16, 3, 3, 4).permute(2, 0, 3, 1, 4)
    cos = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-2, -1)
    scale = torch.exp(torch.minimum(attn.logit_scale, torch.tensor(math.log(100.0))))
    table = attn.cpb_mlp(log_spaced_relative_coords(4))  # 49, heads
    bias = 16 * torch.sigmoid(table[relative_position_index(4).view(-1)].view(16, 16, 3).permute(2, 0, 1))
    logits = cos * scale + bias + mask.repeat(2, 1, 1).unsqueeze(1)
    ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(8, 16, 12) @ attn.proj.weight.T + attn.proj.bias
    assert attn.logit_scale.max() > LOGIT_SCALE_MAX  # the clamp is exercised
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # The bias is 16·sigmoid: strictly inside (0, 16).
    b = attn.relative_position_bias()
    assert b.shape == (3, 16, 16) and 0 < float(b.detach().min()) and float(b.detach().max()) < 16


@pytest.mark.parametrize("shift", [0, 2])
def test_sdpa_and_reference_attention_agree(shift):
    torch.manual_seed(0)
    ref = WindowAttentionV2(dim=16, window_size=4, num_heads=2, attn_impl="reference")
    _randomise_(ref, seed=2)
    fast = WindowAttentionV2(dim=16, window_size=4, num_heads=2, attn_impl="sdpa")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(8, 16, 16, requires_grad=True)
    mask = shift_attention_mask(8, 8, 4, shift)
    torch.testing.assert_close(fast(x, mask), ref(x, mask), atol=1e-5, rtol=0)


def test_res_post_norm_block_is_the_identity_at_release_init_and_norms_after_the_branch():
    model = SwinTransformerV2(
        img_size=32,
        patch_size=2,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=4,
        num_classes=5,
        drop_path_rate=0.0,
    )
    blk = model.layers[0].blocks[1]
    assert isinstance(blk, SwinTransformerBlockV2) and blk.shift_size == 2
    # Zero-initialised post-norms (weight and bias): every block starts as the identity.
    x = torch.randn(2, 16, 16, 16)
    assert torch.equal(blk(x), x)
    # Post-norm: with norm1's weight 1 (norm2 still 0) the block adds LN(attention(x)) to x, so
    # what it adds has zero mean and unit variance over the channels of every token.
    with torch.no_grad():
        blk.norm1.weight.fill_(1.0)
        added = blk(x) - x
    torch.testing.assert_close(added, F.layer_norm(blk._attention(x), (16,)), atol=1e-5, rtol=0)
    torch.testing.assert_close(added.mean(-1), torch.zeros(2, 16, 16), atol=1e-5, rtol=0)


def test_v2_patch_merging_reduces_then_normalises():
    merge = PatchMergingV2(8)
    assert merge.norm.normalized_shape == (16,) and merge.reduction.in_features == 32
    x = torch.randn(2, 6, 6, 8)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(
        merge(x), F.layer_norm(cat @ merge.reduction.weight.T, (16,), merge.norm.weight, merge.norm.bias)
    )


def test_q_and_v_have_biases_and_k_has_none():
    attn = WindowAttentionV2(dim=8, window_size=2, num_heads=2)
    assert attn.qkv.bias is None and attn.q_bias.shape == (8,) and attn.v_bias.shape == (8,)
    with torch.no_grad():
        attn.q_bias.fill_(1.0)
        attn.v_bias.fill_(2.0)
    qkv = attn._qkv(torch.zeros(1, 4, 8)).detach()  # 3, 1, heads, N, d
    assert float(qkv[0].min()) == 1.0 and float(qkv[1].abs().max()) == 0.0 and float(qkv[2].min()) == 2.0


def test_no_weight_decay_keywords_are_the_releases():
    model = SwinTransformerV2(
        img_size=32, patch_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4
    )
    assert model.no_weight_decay_keywords() == {"cpb_mlp", "logit_scale", "relative_position_bias_table"}
    from optimizer import param_groups

    groups = {g["name"]: g["params"] for g in param_groups(model, 0.05)}
    no_decay = {id(p) for p in groups["no_decay"]}
    assert id(model.layers[0].blocks[0].attn.cpb_mlp[0].weight) in no_decay
    assert id(model.layers[0].blocks[0].attn.logit_scale) in no_decay
    assert id(model.layers[0].blocks[0].attn.qkv.weight) not in no_decay


# ---------------------------------------------------------------------------------------------
# 3. Parity with timm's swinv2 models
# ---------------------------------------------------------------------------------------------
PARITY = {
    "window8": (dict(window_size=8), "swinv2_tiny_window8_256", {}),
    "window16": (dict(window_size=16), "swinv2_tiny_window16_256", {}),
}


def _assert_parity(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Eval logits (fp32 and float64), then training gradients of every parameter (float64).

    Measured here, fp32 logits: 2.4e-5 (window 8), 1.5e-5 (window 16), 9.6e-5 (12→16), with 1/τ
    up to its clamp at 100 amplifying rounding; the bound leaves room for another CPU's rounding.
    """
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert a.std() > 0.1  # random weights give logits far from zero: the check bites
    assert _max_abs(a, b) < 2e-4
    with torch.no_grad():
        a, b = ours.double()(x.double()), theirs.double()(x.double())
    assert _max_abs(a, b) < 1e-9

    # Gradients in float64: with 1/τ up to 100, fp32 rounding alone moves some gradients by ~1e-3
    # of their size between two correct implementations; in float64 any real difference shows.
    ours.double().train(), theirs.double().train()
    x = x[:1].double()
    target = torch.tensor([3])
    F.cross_entropy(ours(x), target).backward()
    F.cross_entropy(theirs(x), target).backward()
    timm_params = dict(theirs.named_parameters())
    worst = 0.0
    for name, p in ours.named_parameters():
        g_ref = timm_params[_timm_name(name)].grad
        assert g_ref is not None and p.grad is not None, name
        worst = max(worst, _max_abs(p.grad, g_ref) / (float(g_ref.abs().max()) + 1e-30))
    assert worst < 1e-8, worst


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PARITY))
def test_eval_logits_and_training_gradients_match_timm(case):
    kwargs, timm_name, timm_kwargs = PARITY[case]
    torch.manual_seed(0)
    ours = _randomise_(SwinTransformerV2(img_size=256, **TINY_V2, **kwargs), seed=3)
    _assert_parity(ours, _timm_twin(ours, timm_name, **timm_kwargs))


@pytest.mark.slow
def test_a_192_window_12_checkpoint_fine_tunes_at_256_window_16_as_timm_does(tmp_path):
    """The release's 12→16 recipe: the position-bias MLP carries over; only the inputs it sees
    change, through PRETRAINED_WINDOW_SIZES [12, 12, 12, 6]."""
    torch.manual_seed(0)
    pre = _randomise_(SwinTransformerV2(img_size=192, window_size=12, **TINY_V2), seed=5)
    path = tmp_path / "swinv2_tiny_window12_192.pth"
    torch.save({"model": _released_layout(pre)}, path)

    config = _config(
        V2 / "swinv2_tiny_patch4_window16_256.yaml",
        "MODEL.SWINV2.PRETRAINED_WINDOW_SIZES",
        "[12, 12, 12, 6]",
        "MODEL.DROP_PATH_RATE",
        "0.0",
    )
    ours = build_model(config)
    report = load_pretrained(ours, str(path))
    assert report.missing == [] and report.unexpected == [] and report.resized == [] and report.head == "loaded"
    theirs = _timm_twin(
        ours, "swinv2_tiny_window16_256", state=torch.load(path)["model"], pretrained_window_sizes=(12, 12, 12, 6)
    )
    # Without the pretrained windows the bias MLP would see other inputs: other logits.
    plain = build_model(_config(V2 / "swinv2_tiny_patch4_window16_256.yaml", "MODEL.DROP_PATH_RATE", "0.0"))
    load_pretrained(plain, str(path))
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _max_abs(plain.eval()(x), ours.eval()(x)) > 1e-3
    _assert_parity(ours, theirs)


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints: the release's layout, SimMIM encoders, the other family
# ---------------------------------------------------------------------------------------------
# A small V2 whose every stage keeps a regular and a shifted block (32x32, 2x2 patches, window 4).
TINY_SHAPE = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


def _tiny_v2(**kwargs) -> SwinTransformerV2:
    """TINY_SHAPE with 10 classes, no drop path and every parameter moved off its initial value."""
    opts = dict(TINY_SHAPE, num_classes=10, drop_path_rate=0.0)
    opts.update(kwargs)
    return _randomise_(SwinTransformerV2(**opts), seed=7)


def test_released_v2_checkpoint_loads_with_its_buffers_dropped_and_rebuilt(tmp_path):
    src = _tiny_v2()
    torch.save({"model": _released_layout(src)}, tmp_path / "v2.pth")
    dst = SwinTransformerV2(**TINY_SHAPE, num_classes=10)
    report = load_pretrained(dst, str(tmp_path / "v2.pth"))
    assert (report.missing, report.unexpected, report.resized, report.head) == ([], [], [], "loaded")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    attn = dst.layers[0].blocks[0].attn
    assert torch.equal(attn.relative_coords_table, log_spaced_relative_coords(4))
    assert torch.equal(attn.relative_position_index, relative_position_index(4))


def test_simmim_v2_checkpoint_with_encoder_prefix_and_rpe_mlp_loads_for_fine_tuning(tmp_path):
    src = _tiny_v2(num_classes=0)
    state = {"encoder." + k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in _released_layout(src).items()}
    state["encoder.mask_token"] = torch.zeros(1, 1, 16)
    state["decoder.0.weight"] = torch.zeros(3 * 32 * 32, 128, 1, 1)
    torch.save({"model": state}, tmp_path / "simmim.pth")
    dst = SwinTransformerV2(**TINY_SHAPE, num_classes=10)
    report = load_pretrained(dst, str(tmp_path / "simmim.pth"))
    assert report.head == "re-initialised" and report.missing == [] and report.unexpected == []
    assert sorted(report.dropped) == ["decoder.0.weight", "encoder.mask_token"]  # named in the load report
    mlp = dst.layers[1].blocks[1].attn.cpb_mlp[2].weight
    assert torch.equal(mlp, src.layers[1].blocks[1].attn.cpb_mlp[2].weight)
    assert float(dst.head.weight.detach().abs().max()) == 0.0


def test_a_v1_checkpoint_for_a_v2_model_and_the_reverse_are_refused_in_one_line(tmp_path):
    v1 = build_model(
        get_config(
            None,
            [
                "MODEL.SWIN.EMBED_DIM",
                "16",
                "MODEL.SWIN.NUM_HEADS",
                "[1,2,4,8]",
                "DATA.IMG_SIZE",
                "32",
                "MODEL.SWIN.PATCH_SIZE",
                "2",
                "MODEL.SWIN.WINDOW_SIZE",
                "4",
                "MODEL.NUM_CLASSES",
                "10",
            ],
        )
    )
    v2 = _tiny_v2()
    torch.save({"model": v1.state_dict()}, tmp_path / "v1.pth")
    torch.save({"model": v2.state_dict()}, tmp_path / "v2.pth")
    with pytest.raises(UserError) as e:
        load_pretrained(v2, str(tmp_path / "v1.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "Swin V1 model" in msg and "Swin V2 model" in msg and "v1.pth" in msg
    with pytest.raises(UserError, match=r"holds a Swin V2 model but the config builds a Swin V1 model"):
        load_pretrained(v1, str(tmp_path / "v2.pth"))


# ---------------------------------------------------------------------------------------------
# 5. Any input size, the backbone API, gradient checkpointing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(512, 512), (1280, 1280), (200, 328)])
def test_any_input_size_runs_including_the_sizes_the_release_fails_on(hw):
    model = SwinTransformerV2(
        img_size=256, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=8, num_classes=3
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_padded_windows_equal_an_explicit_pad_crop_reference():
    """A 20×20 map with window 8: the block pads to 24×24, attends, crops; compare with doing
    that by hand with the plain roll + partition path."""
    torch.manual_seed(0)
    blk = _randomise_(SwinTransformerBlockV2(dim=8, num_heads=2, window_size=8, shift_size=4), seed=8).eval()
    x = torch.randn(1, 20, 20, 8)
    padded = F.pad(x, (0, 0, 0, 4, 0, 4))
    windows = window_partition(torch.roll(padded, (-4, -4), (1, 2)), 8).view(-1, 64, 8)
    attended = blk.attn(windows, mask=shift_attention_mask(24, 24, 8, 4)).view(-1, 8, 8, 8)
    from models.windows import window_reverse

    back = torch.roll(window_reverse(attended, 8, 24, 24), (4, 4), (1, 2))[:, :20, :20]
    with torch.no_grad():
        expected = x + blk.norm1(back)
        expected = expected + blk.norm2(blk.mlp(expected))
        torch.testing.assert_close(blk(x), expected, atol=1e-5, rtol=0)


def test_backbone_features_only_out_indices_and_frozen_stages():
    config = _config(
        V2 / "swinv2_tiny_patch4_window8_256.yaml",
        "MODEL.SWINV2.EMBED_DIM",
        "16",
        "MODEL.SWINV2.NUM_HEADS",
        "[1,2,4,8]",
    )
    backbone = build_model(config, features_only=True, out_indices=(1, 3), frozen_stages=1)
    feats = backbone(torch.randn(1, 3, 256, 192))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 32, 24), (1, 128, 8, 6)]
    assert not any(p.requires_grad for p in backbone.layers[0].parameters())
    assert all(p.requires_grad for p in backbone.layers[1].parameters())
    backbone.train()
    assert not backbone.layers[0].training and backbone.layers[1].training
    # Res-post-norms zero-initialised in the backbone too.
    assert float(backbone.layers[2].blocks[0].norm1.weight.detach().abs().max()) == 0.0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _tiny_v2()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 6. Mixed precision: cosine logits and the clamp stay fp32
# ---------------------------------------------------------------------------------------------
def test_attention_logits_stay_fp32_under_fp16_and_bf16_autocast(monkeypatch):
    torch.manual_seed(0)
    attn = _randomise_(WindowAttentionV2(dim=16, window_size=4, num_heads=2, attn_impl="reference"), seed=9)
    seen = []
    real_softmax = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        seen.append(self.dtype)
        return real_softmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    x = torch.randn(4, 16, 16)
    ref = attn(x)
    # q, k and v still come out of the autocast linear in half precision: bf16's 8-bit mantissa
    # bounds how close it can get.
    for dtype, tol in ((torch.bfloat16, 0.1), (torch.float16, 0.02)):
        seen.clear()
        with torch.autocast("cpu", dtype=dtype):
            out = attn(x)
        assert seen == [torch.float32], seen
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)


def test_fp32_logits_are_closer_to_fp32_attention_than_half_precision_logits(monkeypatch):
    """1/τ at its clamp (100) and a strong bias: logits of magnitude ~100, where fp16 keeps only
    ~0.06 of resolution. Computing them in fp32 (ours) lands closer to the fp32 result than the
    same code with the logits left to autocast (as the release does)."""
    import contextlib

    import models.swin_transformer_v2 as v2

    torch.manual_seed(0)
    attn = WindowAttentionV2(dim=32, window_size=8, num_heads=2, attn_impl="reference")
    with torch.no_grad():
        attn.logit_scale.fill_(10.0)  # clamped to log 100
        attn.cpb_mlp[2].weight.mul_(50)
    x = torch.randn(4, 64, 32)
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = attn(x)
    monkeypatch.setattr(v2, "_autocast_off", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(v2, "_full_precision", lambda t: t)
    monkeypatch.setattr(v2, "_logit_precision", lambda t: t)
    with torch.autocast("cpu", dtype=torch.float16):
        half = attn(x)
    err_ours, err_half = _max_abs(ours.float(), ref), _max_abs(half.float(), ref)
    assert torch.isfinite(ours).all()
    assert err_ours < 0.8 * err_half, (err_ours, err_half)


def test_logits_are_fp32_for_fp16_and_for_training_and_stay_bf16_in_bf16_inference():
    from models.swin_transformer_v2 import _logit_precision

    half, bf16, f32 = (torch.ones(2, dtype=d) for d in (torch.float16, torch.bfloat16, torch.float32))
    assert _logit_precision(half).dtype == torch.float32 and _logit_precision(bf16).dtype == torch.float32
    with torch.no_grad():
        assert _logit_precision(half).dtype == torch.float32  # fp16's range, also in inference
        assert _logit_precision(bf16).dtype == torch.bfloat16
        assert _logit_precision(f32).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# 7. Bad input: one line each
# ---------------------------------------------------------------------------------------------
def test_wrong_family_keys_are_refused_naming_the_section_read():
    with pytest.raises(UserError, match=r"MODEL.SWIN.WINDOW_SIZE is set, but MODEL.TYPE 'swinv2' reads MODEL.SWINV2"):
        build_model(_config(V2 / "swinv2_tiny_patch4_window8_256.yaml", "MODEL.SWIN.WINDOW_SIZE", "12"))
    with pytest.raises(
        UserError, match=r"MODEL.SWINV2.PRETRAINED_WINDOW_SIZES is set, but MODEL.TYPE 'swin' reads MODEL.SWIN\b"
    ):
        build_model(_config(None, "MODEL.SWINV2.PRETRAINED_WINDOW_SIZES", "[12, 12, 12, 6]"))


def test_unknown_model_type_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown MODEL.TYPE 'swin_v3'; use one of 'swin', 'swinv2'"):
        build_model(_config(None, "MODEL.TYPE", "swin_v3"))


def test_pretrained_window_sizes_of_the_wrong_length_are_refused():
    with pytest.raises(UserError, match=r"PRETRAINED_WINDOW_SIZES \[12, 12, 12\] has 3 entries for 4 stages"):
        build_model(
            _config(V2 / "swinv2_tiny_patch4_window8_256.yaml", "MODEL.SWINV2.PRETRAINED_WINDOW_SIZES", "[12, 12, 12]")
        )


def test_a_window_larger_than_the_feature_map_is_clamped_and_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="models.swin_transformer"):
        with torch.device("meta"):
            model = build_model(_config(V2 / "swinv2_tiny_patch4_window16_256.yaml"))
    lines = [r.getMessage() for r in caplog.records if "larger than the feature map" in r.getMessage()]
    assert lines == ["window 16 is larger than the feature map: stage 4 (8x8) uses window 8, unshifted (as released)"]
    assert model.layers[3].blocks[1].shift_size == 0


def test_v2_blocks_compile_and_equal_eager_in_eval_and_training():
    import copy

    import torch._dynamo

    from models import compile_model

    torch._dynamo.reset()
    model = _tiny_v2()
    eager = copy.deepcopy(model)
    assert compile_model(model, "blocks", backend="aot_eager") is model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), eager.eval()(x), atol=1e-5, rtol=0)
    model.train()(x).square().mean().backward()
    eager.train()(x).square().mean().backward()
    ref = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n].grad, atol=1e-5, rtol=1e-4, msg=n)
    torch._dynamo.reset()


def test_a_22k_v2_head_maps_onto_the_1k_classes_as_for_v1(tmp_path):
    from models import imagenet22k_to_1k_indices

    src = _tiny_v2(num_classes=21841)
    torch.save({"model": _released_layout(src)}, tmp_path / "v2_22k.pth")
    dst = _tiny_v2(num_classes=1000)
    report = load_pretrained(dst, str(tmp_path / "v2_22k.pth"))
    assert report.head == "mapped-22k-to-1k" and report.missing == [] and report.unexpected == []
    rows = torch.tensor(imagenet22k_to_1k_indices())
    assert torch.equal(dst.head.weight, src.head.weight[rows]) and torch.equal(dst.head.bias, src.head.bias[rows])
    assert int(rows[850]) == 5564  # teddy bear, absent from the 22K synsets: the release's row
