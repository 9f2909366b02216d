"""scripts/explain.py, scripts/predict.py and scripts/plot_logs.py.

The walk is checked against the shapes of the paper's Swin-T at 224 and against a padded input,
where only the running model knows the numbers; the figure functions return the arrays they
drew, which must be the model's own (mask, relative position index, bias). One short training
run of the digits demo (session fixture, slow) gives a real checkpoint and log for predict,
plot_logs and the attention picture; predict's accuracy must equal ``main.py --eval``'s.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from config import get_config
from conftest import run_main
from errors import UserError
from models.swin_transformer import SwinTransformer, shift_attention_mask

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
DEMO_TRAIN_OPTS = ["TRAIN.EPOCHS", "6", "TRAIN.WARMUP_EPOCHS", "1", "DATA.NUM_WORKERS", "0",
                   "DATA.BATCH_SIZE", "16", "TRAIN.BASE_LR", "1.6e-2", "MODEL.DROP_PATH_RATE", "0.0", "SAVE_FREQ", "100"]
# One thread, as measured: the run's numbers then repeat, and it stays fast on a busy machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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
    assert [(b.info["num_windows"], b.info["shift_size"]) for b in result.records if b.step == "block" and b.stage == 4] == [(1, 0), (1, 0)]
    assert [len([b for b in result.records if b.step == "block" and b.stage == s]) for s in (1, 2, 3, 4)] == [2, 2, 6, 2]


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
    assert [s["macs"] for s in stages] == [model.layers[0].flops(56, 56), model.layers[1].flops(28, 28),
                                           model.layers[2].flops(14, 14), model.layers[3].flops(7, 7)]
    parts = result.find("patch_embed").info["macs"] + sum(s["macs"] for s in stages) + result.find("head").info["macs"]
    assert parts == total["macs"]
    assert result.find("patch_embed").info["params"] + sum(s["params"] for s in stages) + result.find("head").info["params"] == total["params"]


def test_printed_walk_of_swin_t_names_the_numbers(swin_t):
    _, result = swin_t
    text = explain.format_walk(result.records, "Swin-T")
    for expected in ("3,136 tokens of 96 channels", "64 windows of 7×7", "3×64×3×49×32", "64×3×49×49",
                     "64×49×96 → 56×56×96", "56×56×96 → 28×28×192: 3,136 → 784 tokens (192 ch)",
                     "params 28,288,354", "MACs 4.494 G"):
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
    assert np.array_equal(drawn["mask"], shift_attention_mask(14, 14, 7, 3).numpy())
    assert drawn["mask"].shape == (4, 49, 49) and set(np.unique(drawn["mask"])) == {0.0, -100.0}
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
    model = SwinTransformer(img_size=96, patch_size=4, embed_dim=8, depths=[2], num_heads=[1], window_size=12, num_classes=2)
    drawn = explain.plot_cyclic_shift_mask(model, str(tmp_path / "mask.png"))
    assert "8×8 map with M=4" in drawn["geometry"].note
    assert np.array_equal(drawn["mask"], shift_attention_mask(8, 8, 4, 2).numpy())


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
    assert predict.resolve_class_names({"class_names": ["cat", "dog"]}, 2) == ["cat", "dog"]
    names = predict.resolve_class_names({}, 1000)
    assert len(names) == 1000 and names[0].startswith("tench") and names[999].startswith("toilet tissue")
    assert predict.resolve_class_names({"class_names": ["a"]}, 3) == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------
# plot_logs without a run
# ---------------------------------------------------------------------------------------------
LOG = """\
[2026-01-01 00:00:01 swin] (engine.py 190): INFO Train: [0/2][0/3]\teta 0:00:01 lr 0.000100\t wd 0.0500\ttime 1.0 (1.0)\tloss 2.3000 (2.3000)\tgrad_norm 4.0000 (4.0000)\tloss_scale 1.0\timg/s 1.0\tmem 1MB
[2026-01-01 00:00:02 swin] (engine.py 190): INFO Train: [0/2][2/3]\teta 0:00:01 lr 0.000200\t wd 0.0500\ttime 1.0 (1.0)\tloss 2.1000 (2.2000)\tgrad_norm 3.0000 (3.5000)\tloss_scale 1.0\timg/s 1.0\tmem 1MB
[2026-01-01 00:00:03 swin] (engine.py 238): INFO  * Acc@1 40.000 Acc@5 90.000 loss 1.9000 images 10
[2026-01-01 00:00:04 swin] (engine.py 190): INFO Train: [1/2][2/3]\teta 0:00:01 lr 1.5e-05\t wd 0.0500\ttime 1.0 (1.0)\tloss 1.5000 (1.6000)\tgrad_norm nan (3.0000)\tloss_scale 1.0\timg/s 1.0\tmem 1MB
[2026-01-01 00:00:05 swin] (engine.py 238): INFO  * Acc@1 70.000 Acc@5 100.000 loss 1.2000 images 10
"""


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
# With a trained demo checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_demo(demo_data, tmp_path_factory):
    """The digits demo trained for the shortest schedule that clears 90 % val accuracy.

    Final val Acc@1 measured (one thread, warmup 1 epoch, no drop path): batch 64 at 2.5e-4 (the
    demo's schedule squeezed) 74 % after 4 of 6 epochs; batch 64 at 5e-4: 89.7 % after 8,
    93.9 % after 10; batch 32 at 5e-4: 86.1 % after 5 (1e-3: 85.0 %); batch 16 at 5e-4: 89.7 %
    after 4, 91.1 % after 5, 93.1 % after 6 (~20 s per epoch on an idle core). Six epochs of
    batch 16 keep a margin over 90 %.
    """
    out = tmp_path_factory.mktemp("demo_run")
    proc = run_main(["--cfg", DEMO_CFG, "--data-path", demo_data, "--output", str(out), "--opts", *DEMO_TRAIN_OPTS],
                    env=ONE_THREAD, timeout=1800)
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
    assert correct / len(results) >= 0.90

    proc = run_main(["--cfg", DEMO_CFG, "--data-path", trained_demo["data"], "--output", str(tmp_path), "--eval",
                     "--resume", trained_demo["ckpt"], "--opts", "DATA.NUM_WORKERS", "0"], env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
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
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "predict.py"), "--resume", renamed, folder,
                           "--json", "--topk", "3", "--batch-size", "8", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD})
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
    assert explain.main(["--resume", trained_demo["ckpt"], "--image", image, "--block", "1.2", "--head", "1",
                         "--out", out]) == 0
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
