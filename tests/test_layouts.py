"""timm- and torchvision-format Swin weights (issue "Load what users already have", item 2): the
layout is recognised, mapped to the release's names, and the model then gives the logits timm's
and torchvision's own models give for the same weights; ``export.py --layout timm`` writes the
other way.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from config import get_config
from errors import UserError
from models import build_model, load_pretrained
from models.layouts import detect_layout, from_official, to_official

ROOT = Path(__file__).resolve().parents[1]
V1_TINY = str(ROOT / "configs" / "swin" / "swin_tiny_patch4_window7_224.yaml")
V2_TINY = str(ROOT / "configs" / "swinv2" / "swinv2_tiny_patch4_window8_256.yaml")


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (V2's zero-initialised post-norms would hide a wrong mapping)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02 if p.ndim > 1 else 0.1)
    return model.eval()


def _reference(library: str, family: str) -> torch.nn.Module:
    if library == "timm":
        return timm.create_model("swin_tiny_patch4_window7_224" if family == "v1" else "swinv2_tiny_window8_256")
    return torchvision.models.swin_t() if family == "v1" else torchvision.models.swin_v2_t()


@pytest.mark.slow
@pytest.mark.parametrize("library", ["timm", "torchvision"])
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_weights_of_timm_and_torchvision_give_their_models_logits_through_pretrained(library, family, tmp_path):
    reference = _randomised(_reference(library, family))
    path = tmp_path / f"{library}_{family}.pth"
    torch.save(reference.state_dict(), path)
    assert detect_layout(torch.load(path, weights_only=True)) == library

    model = build_model(get_config(V1_TINY if family == "v1" else V2_TINY)).eval()
    report = load_pretrained(model, str(path))
    assert report.missing == [] and report.unexpected == [] and report.head == "loaded"
    size = 224 if family == "v1" else 256
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert (got - expected).abs().max().item() < 1e-4


def test_layouts_are_recognised_by_their_keys():
    official = build_model(get_config(V1_TINY)).state_dict()
    assert detect_layout(official) == "official"
    assert detect_layout(from_official(official, "timm")) == "timm"
    assert "layers.3.downsample.reduction.weight" in from_official(official, "timm")  # merging opens stage 4
    assert "layers.0.downsample.reduction.weight" not in from_official(official, "timm")
    assert detect_layout(torchvision.models.swin_t().state_dict()) == "torchvision"


def test_official_to_timm_and_back_is_the_identity_on_every_weight():
    official = {k: v for k, v in build_model(get_config(V2_TINY)).state_dict().items()}
    back = to_official(from_official(official, "timm"))
    kept = {k for k in official if not k.endswith(("relative_position_index", "relative_coords_table", "attn_mask"))}
    assert set(back) == kept and all(torch.equal(back[k], official[k]) for k in kept)


def test_torchvision_v2_query_and_value_biases_come_from_its_one_qkv_bias():
    tv = _randomised(torchvision.models.swin_v2_t())
    state = to_official(tv.state_dict())
    bias = tv.state_dict()["features.1.0.attn.qkv.bias"]
    assert torch.equal(state["layers.0.blocks.0.attn.q_bias"], bias[:96])
    assert torch.equal(state["layers.0.blocks.0.attn.v_bias"], bias[192:])


def test_an_unknown_layout_is_one_line_listing_the_known_ones_and_the_first_keys():
    with pytest.raises(UserError) as e:
        detect_layout({"backbone.stem.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})
    message = str(e.value)
    assert "backbone.stem.weight" in message and "timm" in message and "torchvision" in message
    assert "\n" not in message


def test_a_timm_checkpoint_of_another_variant_is_refused_with_the_mismatched_shapes(tmp_path):
    path = tmp_path / "timm_base.pth"
    torch.save(timm.create_model("swin_base_patch4_window7_224").state_dict(), path)  # 128 channels, not 96
    model = build_model(get_config(V1_TINY))
    with pytest.raises(UserError) as e:
        load_pretrained(model, str(path))
    assert "patch_embed.proj.weight: checkpoint (128, 3, 4, 4) vs model (96, 3, 4, 4)" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_export_writes_the_timm_layout_that_timm_loads_with_the_same_logits(tmp_path):
    model = _randomised(build_model(get_config(V1_TINY)))
    ckpt = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "timm.pth"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), str(ckpt), "--out", str(out), "--layout", "timm"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reference = timm.create_model("swin_tiny_patch4_window7_224").eval()
    reference.load_state_dict(torch.load(out, weights_only=True))  # strict: every key, every shape
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (reference(x) - model(x)).abs().max().item() < 1e-4


def test_a_model_with_an_absolute_position_embedding_is_refused_for_timm_in_one_line(tmp_path, capsys):
    """timm's Swin models have no absolute position embedding: the file would not load there."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import export

    demo = str(ROOT / "configs" / "demo" / "swin_demo_digits.yaml")
    model = build_model(get_config(demo, ["MODEL.SWIN.APE", "True", "MODEL.SWIN.EMBED_DIM", "16"]))
    ckpt = tmp_path / "ape.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    assert export.main([str(ckpt), "--out", str(tmp_path / "timm.pth"), "--layout", "timm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absolute position embedding (MODEL.SWIN.APE), which timm's Swin" in err
    assert export.main([str(ckpt), "--out", str(tmp_path / "ours.pth")]) == 0  # the release's layout has it
