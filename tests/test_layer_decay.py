"""Layer-wise learning-rate decay (TRAIN.LAYER_DECAY): the release's layer ids and scales for
Swin-B and SwinV2-B worked out by hand, unchanged weight-decay exemptions, the four schedules
applying each group's scale, one optimizer step, resuming, the logged table and bad settings.

Swin-B and SwinV2-B (depths 2, 2, 18, 2; L = 24) are built on the 'meta' device: names and
shapes only, no memory. Everything runs on the CPU in well under a second per test.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config import get_config  # noqa: E402
from errors import UserError  # noqa: E402
from lr_scheduler import SCHEDULERS, build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import (  # noqa: E402
    build_optimizer,
    layer_id,
    load_optimizer_state,
    model_depths,
    param_groups,
)

SWIN_B = ROOT / "configs" / "swin" / "swin_base_patch4_window7_224.yaml"
SWINV2_B = ROOT / "configs" / "swinv2" / "swinv2_base_patch4_window8_256.yaml"
DEPTHS_B = (2, 2, 18, 2)
TINY = [
    *("DATA.IMG_SIZE", "32", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1,2,4,8]"),
    *("MODEL.SWIN.DEPTHS", "[2,2,2,2]", "MODEL.NUM_CLASSES", "10", "MODEL.DROP_PATH_RATE", "0.0"),
    *("TRAIN.EPOCHS", "10", "TRAIN.WARMUP_EPOCHS", "2"),
]


def _meta_model(cfg_file: Path, *opts: str) -> nn.Module:
    with torch.device("meta"):
        return build_model(get_config(str(cfg_file), ["MODEL.NUM_CLASSES", "1000", *opts]))


def _tiny(*opts: str, seed: int = 0):
    config = get_config(None, [*TINY, *opts])
    torch.manual_seed(seed)
    return config, build_model(config)


def _group_of(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def _no_decay_names(model: nn.Module, groups: list[dict]) -> set[str]:
    return {n for n, g in _group_of(model, groups).items() if g["weight_decay"] == 0.0}


# ---------------------------------------------------------------------------------------------
# Layer ids and scales
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,expected",
    [
        ("patch_embed.proj.weight", 0),
        ("patch_embed.norm.bias", 0),
        ("absolute_pos_embed", 25),  # the release's last branch: full lr, unlike ViT-style pos_embed
        ("mask_token", 0),
        ("encoder.mask_token", 0),  # SimMIM wraps the model as 'encoder'
        ("encoder.patch_embed.proj.weight", 0),
        ("layers.0.blocks.0.norm1.weight", 1),
        ("layers.0.blocks.1.attn.qkv.weight", 2),
        ("layers.0.downsample.reduction.weight", 2),  # merging at the end of stage 0: its last block
        ("layers.1.blocks.0.mlp.fc1.weight", 3),
        ("layers.1.downsample.norm.weight", 4),
        ("layers.2.blocks.0.attn.proj.bias", 5),
        ("layers.2.blocks.5.attn.relative_position_bias_table", 2 + 2 + 5 + 1),
        ("encoder.layers.2.blocks.17.mlp.fc2.weight", 22),
        ("layers.2.downsample.reduction.weight", 22),
        ("layers.3.blocks.0.norm2.bias", 23),
        ("layers.3.blocks.1.attn.cpb_mlp.0.weight", 24),
        ("norm.weight", 25),
        ("head.weight", 25),
        ("encoder.norm.bias", 25),
        ("decoder.0.weight", 25),  # names it does not know belong to the last layer
        ("norm3.weight", 25),
        ("layers_extra.weight", 25),
    ],
)
def test_layer_id_numbers_parameters_as_the_release_for_depths_2_2_18_2(name: str, expected: int) -> None:
    assert layer_id(name, DEPTHS_B) == expected


@pytest.mark.parametrize("cfg_file", [SWIN_B, SWINV2_B], ids=["swin_b", "swinv2_b"])
def test_base_models_at_0_75_get_26_layers_scaled_0_75_to_the_25_minus_id(cfg_file: Path) -> None:
    model = _meta_model(cfg_file)
    assert model_depths(model) == list(DEPTHS_B)
    groups = param_groups(model, 0.05, layer_decay=0.75)

    # Worked out by hand: L = 2 + 2 + 18 + 2 = 24, ids 0 (patch embedding) .. 25 (norm, head),
    # scale = 0.75 ** (24 + 1 - id); every layer has decayed matrices and non-decayed vectors.
    expected = {(k, kind): 0.75 ** (25 - k) for k in range(26) for kind in ("decay", "no_decay")}
    got = {}
    for g in groups:
        lid, kind = g["name"][len("layer_") :].split("_", 1)
        got[(int(lid), kind)] = g["lr_scale"]
        assert g["weight_decay"] == (0.05 if kind == "decay" else 0.0)
    assert got.keys() == expected.keys()
    for key, scale in expected.items():
        assert got[key] == pytest.approx(scale, rel=1e-12), key
    assert len(groups) == 52

    of = _group_of(model, groups)
    hand = {
        "patch_embed.proj.weight": ("layer_0_decay", 0.75**25),  # 7.5254e-04
        "patch_embed.proj.bias": ("layer_0_no_decay", 0.75**25),
        "layers.0.blocks.0.attn.qkv.weight": ("layer_1_decay", 0.75**24),
        "layers.0.downsample.reduction.weight": ("layer_2_decay", 0.75**23),
        "layers.1.downsample.reduction.weight": ("layer_4_decay", 0.75**21),
        "layers.1.downsample.norm.weight": ("layer_4_no_decay", 0.75**21),
        "layers.2.blocks.5.mlp.fc1.weight": ("layer_10_decay", 0.75**15),  # 2 + 2 + 5 + 1 = 10
        "layers.2.blocks.5.mlp.fc1.bias": ("layer_10_no_decay", 0.75**15),
        "layers.2.downsample.reduction.weight": ("layer_22_decay", 0.75**3),
        "layers.3.blocks.1.mlp.fc2.weight": ("layer_24_decay", 0.75),
        "norm.weight": ("layer_25_no_decay", 1.0),
        "head.weight": ("layer_25_decay", 1.0),
        "head.bias": ("layer_25_no_decay", 1.0),
    }
    for name, (group, scale) in hand.items():
        assert of[name]["name"] == group, name
        assert of[name]["lr_scale"] == pytest.approx(scale, rel=1e-12), name
    # Every trainable parameter is in exactly one group.
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # The last layer comes first, so the lr the training log shows (param_groups[0]) is the full one.
    assert groups[0]["name"] == "layer_25_decay" and groups[0]["lr_scale"] == 1.0


def test_swin_b_and_v2_b_place_their_own_parameters_in_the_same_layers() -> None:
    v1, v2 = _meta_model(SWIN_B), _meta_model(SWINV2_B)
    for model in (v1, v2):
        of = _group_of(model, param_groups(model, 0.05, layer_decay=0.75))
        for n, g in of.items():
            assert g["name"].startswith(f"layer_{layer_id(n, DEPTHS_B)}_"), n
    v2_only = {n for n, _ in v2.named_parameters() if "cpb_mlp" in n or "logit_scale" in n or "q_bias" in n}
    of = _group_of(v2, param_groups(v2, 0.05, layer_decay=0.75))
    assert of["layers.2.blocks.5.attn.cpb_mlp.0.weight"]["name"] == "layer_10_no_decay"
    assert of["layers.2.blocks.5.attn.logit_scale"]["name"] == "layer_10_no_decay"
    assert all(of[n]["name"].endswith("_no_decay") for n in v2_only)


@pytest.mark.parametrize(
    "cfg_file,opts",
    [(SWIN_B, ("MODEL.SWIN.APE", "True")), (SWINV2_B, ())],
    ids=["swin_b_ape", "swinv2_b"],
)
def test_layer_decay_leaves_the_weight_decay_exemptions_unchanged(cfg_file: Path, opts: tuple) -> None:
    model = _meta_model(cfg_file, *opts)
    plain = param_groups(model, 0.05)
    layered = param_groups(model, 0.05, layer_decay=0.75)
    assert _no_decay_names(model, layered) == _no_decay_names(model, plain)

    exempt = _no_decay_names(model, layered)
    keywords = ("relative_position_bias_table", "cpb_mlp", "logit_scale", "absolute_pos_embed")
    for n, p in model.named_parameters():
        should = p.ndim <= 1 or n.endswith(".bias") or any(k in n for k in keywords)
        assert (n in exempt) == should, n
    if cfg_file == SWIN_B:
        assert "absolute_pos_embed" in exempt and "layers.0.blocks.0.attn.relative_position_bias_table" in exempt
    else:
        assert "layers.0.blocks.0.attn.cpb_mlp.0.weight" in exempt and "layers.0.blocks.0.attn.logit_scale" in exempt


def test_layer_decay_1_keeps_the_two_groups_decay_and_no_decay() -> None:
    model = _meta_model(SWIN_B)
    groups = param_groups(model, 0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert all("lr_scale" not in g for g in groups)
    assert [g["name"] for g in param_groups(model, 0.05, layer_decay=1.0)] == ["decay", "no_decay"]


def test_a_models_own_no_weight_decay_lists_still_apply_with_layer_decay() -> None:
    _, model = _tiny()

    class Extra(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.encoder = inner  # as SimMIM
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 16))
            self.decoder = nn.Conv2d(128, 48, 1)

        def no_weight_decay(self) -> set[str]:
            return {"encoder.head.weight"}

        def no_weight_decay_keywords(self) -> set[str]:
            return {"reduction"}

    wrapped = Extra(model)
    assert model_depths(wrapped) == [2, 2, 2, 2]
    of = _group_of(wrapped, param_groups(wrapped, 0.05, layer_decay=0.5))
    assert of["encoder.head.weight"]["name"] == "layer_9_no_decay"
    assert of["encoder.layers.1.downsample.reduction.weight"]["name"] == "layer_4_no_decay"
    assert of["encoder.layers.1.blocks.0.attn.qkv.weight"]["name"] == "layer_3_decay"
    assert of["mask_token"]["lr_scale"] == pytest.approx(0.5**9)
    assert of["encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5**9)
    assert of["decoder.weight"]["name"] == "layer_9_decay" and of["decoder.weight"]["lr_scale"] == 1.0


def test_frozen_parameters_stay_out_of_every_group() -> None:
    _, model = _tiny()
    model.patch_embed.requires_grad_(False)
    groups = param_groups(model, 0.05, layer_decay=0.75)
    assert not any(g["name"].startswith("layer_0_") for g in groups)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Schedules, one step, resuming, the log
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_schedule_gives_each_group_the_schedule_lr_times_its_lr_scale(name: str) -> None:
    opts = ("TRAIN.LR_SCHEDULER.NAME", name, "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "3")
    opts += ("TRAIN.LR_SCHEDULER.MULTISTEPS", "[4,6]")
    config, model = _tiny(*opts, "TRAIN.LAYER_DECAY", "0.8")
    ref_config, ref_model = _tiny(*opts)
    lrs = dict(base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    opt = build_optimizer(config, model)
    sched = build_scheduler(config, opt, 10, **lrs)
    ref_opt = build_optimizer(ref_config, ref_model)
    ref_sched = build_scheduler(ref_config, ref_opt, 10, **lrs)

    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == pytest.approx([0.8**k for k in range(9, -1, -1)])  # ids 0..9, L = 8

    def check() -> None:
        ref = ref_opt.param_groups[0]["lr"]
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(ref * g["lr_scale"], rel=1e-12), (g["name"], ref)
            assert g["initial_lr"] == pytest.approx(1e-3)  # the schedule's peak stays unscaled

    check()  # right after construction: warmup lr x scale
    assert opt.param_groups[-1]["lr"] == pytest.approx(1e-6 * 0.8**9)
    for t in (0, 1, 10, 20, 35, 50, 79, 100, 150):
        sched.step_update(t)
        ref_sched.step_update(t)
        check()
    sched.step_update(20)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # head, end of warmup
    assert opt.param_groups[-1]["lr"] == pytest.approx(1e-3 * 0.8**9)  # patch embedding


def test_one_adamw_step_with_layer_decay_moves_the_patch_embedding_less_than_the_head() -> None:
    def step(decay: str) -> float:
        config, model = _tiny("TRAIN.LAYER_DECAY", decay, "TRAIN.WEIGHT_DECAY", "0.0", "TRAIN.BASE_LR", "1e-3")
        opt = build_optimizer(config, model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
        return moved["patch_embed.proj.weight"] / moved["head.weight"]

    # Adam's first step moves each weight by about its lr: the ratio is the scale, 0.5 ** (8 + 1).
    assert step("0.5") == pytest.approx(0.5**9, rel=1e-2)
    assert step("1.0") == pytest.approx(1.0, rel=1e-2)


def test_resuming_with_the_same_layer_decay_restores_moments_and_keeps_the_scales() -> None:
    config, model = _tiny("TRAIN.LAYER_DECAY", "0.75")
    opt = build_optimizer(config, model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    saved = opt.state_dict()

    again = build_optimizer(config, model)
    load_optimizer_state(again, saved)
    assert [g["lr_scale"] for g in again.param_groups] == [g["lr_scale"] for g in opt.param_groups]
    assert [g["name"] for g in again.param_groups] == [g["name"] for g in opt.param_groups]
    p = model.patch_embed.proj.weight
    torch.testing.assert_close(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])


@pytest.mark.parametrize("was,now", [("0.75", "1.0"), ("1.0", "0.75"), ("0.75", "0.65")])
def test_resuming_with_another_layer_decay_is_a_one_line_user_error(was: str, now: str) -> None:
    config, model = _tiny("TRAIN.LAYER_DECAY", was)
    saved = build_optimizer(config, model).state_dict()
    other = build_optimizer(_tiny("TRAIN.LAYER_DECAY", now)[0], model)
    with pytest.raises(UserError, match=f"trained with TRAIN.LAYER_DECAY {float(was):g}") as err:
        load_optimizer_state(other, saved)
    assert "\n" not in str(err.value) and f"--opts TRAIN.LAYER_DECAY {float(was):g}" in str(err.value)


def test_the_groups_are_logged_once_as_a_table_of_layers(caplog: pytest.LogCaptureFixture) -> None:
    config, model = _tiny("TRAIN.LAYER_DECAY", "0.75")
    with caplog.at_level(logging.INFO, logger="swin.optimizer"):
        build_optimizer(config, model)
    records = [r for r in caplog.records if r.name == "swin.optimizer"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    lines = records[0].getMessage().splitlines()
    assert "layer-wise lr decay 0.75" in lines[0] and "20 param groups" in lines[0]
    assert lines[1].split()[:3] == ["layer", "lr", "scale"]
    rows = lines[2:]
    assert [int(r.split()[0]) for r in rows] == list(range(10))
    assert float(rows[0].split()[1]) == pytest.approx(0.75**9, rel=1e-3)
    assert float(rows[-1].split()[1]) == 1.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="swin.optimizer"):
        build_optimizer(_tiny()[0], model)  # layer decay off: nothing to report
    assert not [r for r in caplog.records if r.name == "swin.optimizer"]


# ---------------------------------------------------------------------------------------------
# Bad settings
# ---------------------------------------------------------------------------------------------
def test_layer_decay_on_a_model_without_stages_is_a_one_line_user_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert model_depths(model) is None
    with pytest.raises(UserError, match="TRAIN.LAYER_DECAY 1.0") as err:
        param_groups(model, 0.05, layer_decay=0.75)
    assert "\n" not in str(err.value)
    assert [g["name"] for g in param_groups(model, 0.05)] == ["decay", "no_decay"]  # off: fine


@pytest.mark.parametrize("decay", ["0.0", "-0.5", "1.5"])
def test_layer_decay_outside_0_to_1_is_a_user_error(decay: str) -> None:
    config, model = _tiny("TRAIN.LAYER_DECAY", decay)
    with pytest.raises(UserError, match=r"TRAIN.LAYER_DECAY must be in \(0, 1\]"):
        build_optimizer(config, model)
