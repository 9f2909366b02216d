"""Fine-tuning from pre-trained weights: table and embedding resizing, the 22K→1K head, custom datasets."""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
import pytest
import torch

from config import get_config
from models import build_model, imagenet22k_to_1k_indices, load_pretrained
from models.pretrained import resize_relative_position_bias_table
from tests.conftest import DEMO_CFG, ROOT, run_main

# The release's 22K->1K mapping (1,000 row indices, one per line), kept as test data so that the
# comparison runs in any clone: an independent record of what the derivation must give.
REFERENCE_MAP = os.path.join(ROOT, "tests", "data", "map22kto1k.txt")

# A small Swin with the demo's layout, quick to build and run on CPU.
TINY = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1,2,4,8]", "MODEL.SWIN.DEPTHS", "[1,1,1,1]"]


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (the one PyTorch's bicubic mode uses, a = -0.75)."""
    x = np.abs(x)
    return np.where(
        x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1, np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0)
    )


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation matrix, half-pixel centres, edge samples clamped."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[o, min(max(tap, 0), n_in - 1)] += _cubic(np.array(src - tap))
    return m


def _independent_resize(grid: np.ndarray, n_out: int) -> np.ndarray:
    """Separable bicubic resize of a (n, n) grid written from the formula, not from torch."""
    m = _bicubic_matrix(grid.shape[0], n_out)
    return m @ grid @ m.T


def test_window_7_to_12_table_resize_equals_an_independent_bicubic_computation():
    torch.manual_seed(0)
    table = torch.randn(13 * 13, 3)  # (2*7-1)^2 rows, 3 heads
    resized = resize_relative_position_bias_table(table, 23 * 23)
    assert resized.shape == (529, 3)
    for head in range(3):
        expected = _independent_resize(table[:, head].reshape(13, 13).double().numpy(), 23)
        np.testing.assert_allclose(resized[:, head].reshape(23, 23).numpy(), expected, atol=1e-5)


def test_loading_a_window_7_checkpoint_into_a_window_12_model_resizes_every_table(tmp_path):
    src = build_model(get_config(None, TINY + ["DATA.IMG_SIZE", "224", "MODEL.SWIN.WINDOW_SIZE", "7"]))
    dst = build_model(get_config(None, TINY + ["DATA.IMG_SIZE", "384", "MODEL.SWIN.WINDOW_SIZE", "12"]))
    path = tmp_path / "w7.pth"
    torch.save({"model": src.state_dict()}, path)
    report = load_pretrained(dst, str(path))
    tables = [k for k in src.state_dict() if k.endswith("relative_position_bias_table")]
    # Stage 4 is 7x7 at 224 (one whole-map window) and 12x12 at 384: every table changes size.
    assert sorted(report.resized) == sorted(tables) and report.missing == []
    key = tables[0]
    heads = src.state_dict()[key].shape[1]
    for h in range(heads):
        expected = _independent_resize(src.state_dict()[key][:, h].reshape(13, 13).double().numpy(), 23)
        np.testing.assert_allclose(dst.state_dict()[key][:, h].reshape(23, 23).numpy(), expected, atol=1e-5)
    # Everything else is copied as is.
    k = "layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(dst.state_dict()[k], src.state_dict()[k])


def test_absolute_position_embedding_is_resized_bicubically(tmp_path):
    src = build_model(
        get_config(None, TINY + ["MODEL.SWIN.APE", "True", "DATA.IMG_SIZE", "32", "MODEL.SWIN.WINDOW_SIZE", "4"])
    )
    dst = build_model(
        get_config(None, TINY + ["MODEL.SWIN.APE", "True", "DATA.IMG_SIZE", "48", "MODEL.SWIN.WINDOW_SIZE", "4"])
    )
    path = tmp_path / "ape.pth"
    torch.save({"model": src.state_dict()}, path)
    report = load_pretrained(dst, str(path))
    assert "absolute_pos_embed" in report.resized
    old = src.absolute_pos_embed.detach()[0]  # (8*8, C)
    new = dst.absolute_pos_embed.detach()[0]  # (12*12, C)
    assert new.shape == (144, 16)
    for c in (0, 7, 15):
        expected = _independent_resize(old[:, c].reshape(8, 8).double().numpy(), 12)
        np.testing.assert_allclose(new[:, c].reshape(12, 12).numpy(), expected, atol=1e-5)


def test_22k_to_1k_mapping_equals_the_released_mapping():
    with open(REFERENCE_MAP) as f:
        reference = [int(line) for line in f.read().split()]
    mapping = imagenet22k_to_1k_indices()
    assert len(mapping) == 1000
    assert list(mapping) == reference
    assert mapping[850] == 5564  # teddy bear, absent from the 22K synset list


def test_a_21841_class_head_keeps_the_rows_of_the_1k_classes(tmp_path):
    torch.manual_seed(0)
    src = build_model(get_config(None, TINY + ["MODEL.NUM_CLASSES", "21841"]))
    dst = build_model(get_config(None, TINY + ["MODEL.NUM_CLASSES", "1000"]))
    path = tmp_path / "22k.pth"
    torch.save({"model": src.state_dict()}, path)
    report = load_pretrained(dst, str(path))
    assert report.head == "mapped-22k-to-1k"
    with open(REFERENCE_MAP) as f:
        rows = torch.tensor([int(line) for line in f.read().split()])
    assert torch.equal(dst.head.weight, src.head.weight[rows])
    assert torch.equal(dst.head.bias, src.head.bias[rows])


def test_another_class_count_reinitialises_the_head_to_zero_with_a_warning(tmp_path, caplog):
    src = build_model(get_config(None, TINY + ["MODEL.NUM_CLASSES", "1000"]))
    dst = build_model(get_config(None, TINY + ["MODEL.NUM_CLASSES", "10"]))
    path = tmp_path / "1k.pth"
    torch.save({"model": src.state_dict()}, path)
    with caplog.at_level(logging.WARNING):
        report = load_pretrained(dst, str(path))
    assert report.head == "re-initialised" and report.missing == []
    assert torch.count_nonzero(dst.head.weight) == 0 and torch.count_nonzero(dst.head.bias) == 0
    assert any("1000 classes" in r.message and "10" in r.message for r in caplog.records)


def test_another_architecture_is_refused_listing_the_mismatched_shapes(tmp_path):
    from errors import UserError

    src = build_model(
        get_config(
            None, ["MODEL.SWIN.EMBED_DIM", "32", "MODEL.SWIN.NUM_HEADS", "[1,2,4,8]", "MODEL.SWIN.DEPTHS", "[1,1,1,1]"]
        )
    )
    dst = build_model(get_config(None, TINY))
    path = tmp_path / "other.pth"
    torch.save({"model": src.state_dict()}, path)
    with pytest.raises(
        UserError,
        match=r"does not fit this architecture .*patch_embed\.proj\.weight: "
        r"checkpoint \(32, 3, 4, 4\) vs model \(16, 3, 4, 4\)",
    ):
        load_pretrained(dst, str(path))


def test_safetensors_export_loads_back_as_pretrained_weights(tmp_path):
    from scripts.export import export

    src = build_model(get_config(None, TINY + ["MODEL.NUM_CLASSES", "10"]))
    torch.save(
        {"model": src.state_dict(), "class_names": [str(i) for i in range(10)], "config": "X: 1\n"}, tmp_path / "c.pth"
    )
    n = export(str(tmp_path / "c.pth"), str(tmp_path / "c.safetensors"))
    assert n == len(src.state_dict())
    dst = build_model(get_config(None, TINY + ["MODEL.NUM_CLASSES", "10"]))
    report = load_pretrained(dst, str(tmp_path / "c.safetensors"))
    assert report.missing == [] and report.head == "loaded"
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    from checkpoint import load_checkpoint_file

    meta = load_checkpoint_file(str(tmp_path / "c.safetensors"))
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["config"] == "X: 1\n"


@pytest.mark.slow
def test_a_22k_checkpoint_fine_tunes_on_the_digits_through_main_then_resumes(tmp_path, demo_data):
    """A 21,841-class checkpoint at 64x64 / window 8 fine-tunes at 32x32 / window 4 on 10 classes."""
    pre = build_model(
        get_config(
            None,
            TINY
            + [
                "MODEL.NUM_CLASSES",
                "21841",
                "DATA.IMG_SIZE",
                "64",
                "MODEL.SWIN.WINDOW_SIZE",
                "8",
                "MODEL.SWIN.PATCH_SIZE",
                "2",
            ],
        )
    )
    ckpt = tmp_path / "pre22k.pth"
    torch.save({"model": pre.state_dict()}, ckpt)
    common = [
        "--cfg",
        DEMO_CFG,
        "--data-path",
        demo_data,
        "--output",
        str(tmp_path / "out"),
        "--tag",
        "ft",
        "--opts",
        *TINY,
        "DATA.NUM_WORKERS",
        "0",
        "TRAIN.WARMUP_EPOCHS",
        "0",
    ]
    first = run_main(common + ["TRAIN.EPOCHS", "1", "MODEL.PRETRAINED", str(ckpt)])
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert "head re-initialised" in log and re.search(r"resized \d+", log)
    # The run validates once right after loading, before training (as the release does).
    assert log.index("Accuracy of the network") < log.index("start training")
    run_dir = tmp_path / "out" / "swin_demo_digits" / "ft"
    assert (run_dir / "ckpt_epoch_0.pth").exists()
    second = run_main(common + ["TRAIN.EPOCHS", "2", "MODEL.PRETRAINED", str(ckpt)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at epoch 1" in second.stdout + second.stderr
    assert (run_dir / "ckpt_epoch_1.pth").exists()
