"""SimMIM pre-training (issue "Self-supervised pre-training", items 1-4 and 6): the mask generator
as released, the model's pieces against explicit reference computations, the release's configs
and key layout, pre-training through main.py (loss falls, --eval reports the reconstruction loss,
bad input in one line) and fine-tuning from the result with --pretrained.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import float_images, read_sample
from PIL import Image

import main as main_module
from config import get_config
from data.sample_seeds import seeded_rngs
from data.simmim import MaskGenerator, SimMIMTransform, build_pretraining_dataset
from errors import UserError
from models import build_model
from models.pretrained import load_pretrained
from models.simmim import SimMIM, masked_l1_loss, normalise_targets, pixel_mask, replace_masked_tokens

ROOT = Path(__file__).resolve().parents[1]
SIMMIM_DEMO = str(ROOT / "configs" / "demo" / "simmim_demo_digits.yaml")
SWIN_DEMO = str(ROOT / "configs" / "demo" / "swin_demo_digits.yaml")
SIMMIM_CONFIGS = sorted((ROOT / "configs" / "simmim").glob("*.yaml"))
TINY = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1,2,4,8]", "DATA.NUM_WORKERS", "0"]
RECON_LINE = re.compile(r" \* reconstruction loss ([\d.]+) images (\d+)")
TRAIN_LOSS = re.compile(r"Train: \[\d+/\d+\]\[\d+/\d+\].*?loss ([\d.]+) \(")


# ----------------------------------------------------------------------------- the mask (item 2)


def test_the_released_mask_hides_22_of_36_cells_each_an_8x8_block_of_patch_tokens():
    mask = MaskGenerator(input_size=192, mask_patch=32, model_patch=4, ratio=0.6)()
    assert mask.shape == (48, 48) and mask.dtype == np.int64
    cells = mask.reshape(6, 8, 6, 8)
    # every 8x8 block is all masked or all visible, and exactly ceil(36 * 0.6) = 22 are masked
    assert (cells.min(axis=(1, 3)) == cells.max(axis=(1, 3))).all()
    assert cells.max(axis=(1, 3)).sum() == 22
    assert mask.sum() == 22 * 64


def test_masks_depend_only_on_the_sample_seed():
    gen = MaskGenerator(192, 32, 4, 0.6)
    with seeded_rngs(1234):
        a = gen()
    np.random.seed(99)  # whatever the global stream was doing
    with seeded_rngs(1234):
        b = gen()
    with seeded_rngs(1235):
        c = gen()
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize(
    "size, mask_patch, model_patch, says",
    [(200, 32, 4, "not divisible by DATA.MASK_PATCH_SIZE 32"), (192, 30, 4, "not a multiple of the model's patch")],
)
def test_sizes_that_do_not_divide_are_one_line_naming_what_works(size, mask_patch, model_patch, says):
    with pytest.raises(UserError) as e:
        MaskGenerator(size, mask_patch, model_patch, 0.6)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert "e.g." in str(e.value)


def test_the_pretraining_transform_is_the_released_crop_flip_normalise_and_a_mask(demo_data):
    config = get_config(SIMMIM_DEMO)
    dataset = build_pretraining_dataset(config, os.path.join(demo_data, "train"), is_train=True)
    (image, mask), target, replaced = read_sample(dataset, (3, 777))
    image2, mask2 = float_images(dataset[(3, 777)][0])
    assert image.shape == (3, 32, 32) and mask.shape == (16, 16) and target == 0 and replaced == ""
    assert torch.equal(image, image2) and torch.equal(mask, mask2)  # seeded per sample: exact resume
    assert int(mask.sum()) == 10 * 16  # ceil(16 * 0.6) = 10 cells of 4x4 tokens
    crop = [t for t in SimMIMTransform(config, True).reference.transforms if type(t).__name__ == "RandomResizedCrop"]
    assert crop[0].scale == (0.67, 1.0) and crop[0].ratio == pytest.approx((3 / 4, 4 / 3))


def _generator_states() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def test_the_fast_pretraining_crop_makes_the_released_draws_within_the_resize_tolerance():
    from sklearn.datasets import load_sample_image

    config = get_config(SIMMIM_DEMO, ["DATA.IMG_SIZE", "64"])
    reference_config = get_config(SIMMIM_DEMO, ["DATA.IMG_SIZE", "64", "DATA.PIPELINE", "reference"])
    fast, ref = SimMIMTransform(config, True), SimMIMTransform(reference_config, True)
    assert fast.image is not fast.reference and ref.image is ref.reference
    evaluation = SimMIMTransform(config, False)
    assert evaluation.image is evaluation.reference  # no random crop to speed up there
    photo = Image.fromarray(load_sample_image("china.jpg"))
    images = [photo, photo.resize((300, 220)), photo.crop((40, 30, 130, 100)), photo.resize((48, 40))]
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    means = []
    for seed in range(15):
        for img in images:
            with seeded_rngs(seed):
                (a, mask_a), after_fast = float_images(fast(img)), _generator_states()
            with seeded_rngs(seed):
                (b, mask_b), after_ref = ref(img), _generator_states()
            # Same crop box, flip and mask; pixels within 2 grey levels (torch's resize vs Pillow's).
            assert torch.equal(mask_a, mask_b) and after_fast == after_ref
            diff = ((a - b) * std * 255).abs()
            assert diff.max() <= 2.01, (seed, img.size)
            means.append(diff.mean().item())
    assert np.mean(means) < 0.05
    with pytest.raises(UserError, match="DATA.PIPELINE"):
        SimMIMTransform(get_config(SIMMIM_DEMO, ["DATA.PIPELINE", "turbo"]), True)


# ----------------------------------------------------------------------------- the model (item 1)


def test_masked_tokens_become_the_mask_token_and_visible_ones_stay():
    tokens = torch.randn(2, 4, 4, 8)
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[0, 1, 2] = mask[1, 3, 0] = 1
    token = torch.randn(1, 1, 8)
    out = replace_masked_tokens(tokens, mask, token)
    assert torch.equal(out[0, 1, 2], token.view(8)) and torch.equal(out[1, 3, 0], token.view(8))
    keep = mask == 0
    assert torch.equal(out[keep], tokens[keep])


def test_the_normalised_target_matches_an_explicit_neighbourhood_mean_and_unbiased_std():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    out = normalise_targets(images, window=5)
    for c, i, j in [(0, 0, 0), (1, 5, 7), (2, 11, 3), (0, 2, 11)]:
        patch = images[0, c, max(0, i - 2) : i + 3, max(0, j - 2) : j + 3]  # clipped at the border
        expected = (images[0, c, i, j] - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
        assert out[0, c, i, j].item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-9)


def test_the_loss_is_the_per_channel_mean_absolute_error_over_masked_pixels_only():
    torch.manual_seed(0)
    target, prediction = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    token_mask = torch.zeros(2, 4, 4)
    token_mask[:, :2] = 1  # the top half of every image
    mask = pixel_mask(token_mask, 2)
    assert mask.shape == (2, 1, 8, 8) and mask.sum() == 2 * 32
    loss = masked_l1_loss(target, prediction, mask)
    expected = (target - prediction)[:, :, :4].abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed = prediction.clone()
    changed[:, :, 4:] += 100.0  # visible pixels do not count
    assert masked_l1_loss(target, changed, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def _swin_b_simmim() -> SimMIM:
    config = get_config(str(ROOT / "configs/simmim/simmim_pretrain__swin_base__img192_window6__800ep.yaml"))
    config.defrost()
    config.TRAIN.PRETRAIN = "simmim"
    with torch.device("meta"):
        return build_model(config)


def test_the_simmim_model_keeps_the_releases_keys_and_shapes():
    model = _swin_b_simmim()
    state = model.state_dict()
    assert state["encoder.mask_token"].shape == (1, 1, 128)
    assert state["decoder.0.weight"].shape == (32 * 32 * 3, 1024, 1, 1)  # 1x1 conv to stride^2 * 3
    assert not any(k.startswith("encoder.head") for k in state)  # the encoder has no classifier
    assert model.encoder_stride == 32
    assert "encoder.mask_token" in model.no_weight_decay()


@pytest.mark.parametrize("path", SIMMIM_CONFIGS, ids=lambda p: p.stem)
def test_the_releases_simmim_configs_load_unchanged_and_build(path):
    pretrain = "pretrain" in path.stem
    config = get_config(str(path), ["TRAIN.PRETRAIN", "simmim"] if pretrain else None)
    with torch.device("meta"):
        model = build_model(config)
    assert isinstance(model, SimMIM) == pretrain
    if pretrain:
        assert config.TRAIN.LR_SCHEDULER.NAME == "multistep" and list(config.TRAIN.LR_SCHEDULER.MULTISTEPS) == [700]
        assert config.DATA.IMG_SIZE == 192 and config.DATA.MASK_PATCH_SIZE == 32
    else:
        assert config.TRAIN.LAYER_DECAY in (0.7, 0.75, 0.8)
    if "swinv2" in path.stem and pretrain:
        assert config.MODEL.SIMMIM.NORM_TARGET.ENABLE and model.norm_target and model.norm_target_window == 47


def test_reconstruction_of_masked_patches_learns_to_beat_the_mean_pixel(demo_data):
    """A short pre-training run on the digits: the loss falls and masked pixels are predicted
    better than by the mean of the image's visible pixels."""
    torch.manual_seed(0)
    config = get_config(SIMMIM_DEMO, TINY)
    model = build_model(config)
    dataset = build_pretraining_dataset(config, os.path.join(demo_data, "train"), is_train=True)
    batches = []
    for start in range(0, 32 * 4, 32):
        items = [dataset[(i, 1000 + i)] for i in range(start, start + 32)]
        batches.append((torch.stack([float_images(x[0][0]) for x in items]), torch.stack([x[0][1] for x in items])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    losses = []
    for _ in range(8):
        for images, masks in batches:
            loss = model(images, masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])

    model.eval()
    images, masks = batches[0]
    with torch.no_grad():
        model_loss = model(images, masks).item()
    pix = pixel_mask(masks, 2)
    visible_mean = (images * (1 - pix)).sum((2, 3), keepdim=True) / (1 - pix).sum((2, 3), keepdim=True)
    baseline = masked_l1_loss(images, visible_mean.expand_as(images), pix).item()
    assert model_loss < 0.8 * baseline, (model_loss, baseline)


# ----------------------------------------------------------------------------- main.py (items 3, 4)


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main_module.main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _pretrain_args(data: str, out: Path, *extra: str, opts: tuple[str, ...] = ()) -> list[str]:
    return [
        *("--cfg", SIMMIM_DEMO, "--data-path", data, "--output", str(out), "--device", "cpu", "--batch-size", "16"),
        *extra,
        *("--opts", *TINY, "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "0", "AMP_ENABLE", "False", *opts),
    ]


@pytest.mark.slow
def test_pretraining_through_main_then_eval_reports_the_reconstruction_loss_and_fine_tuning_loads_it(
    small_data, tmp_path, capsys
):
    code, out = _run(_pretrain_args(small_data, tmp_path, "--pretrain", "simmim", "--tag", "pt"), capsys)
    assert code == 0, out[-3000:]
    assert "SimMIM pre-training: 80 train / 15 val images" in out
    epochs = RECON_LINE.findall(out)
    assert len(epochs) == 2 and all(n == "15" for _, n in epochs)
    ckpt = tmp_path / "simmim_demo_digits" / "pt" / "ckpt_epoch_1.pth"
    saved = torch.load(ckpt, weights_only=True)
    assert "encoder.mask_token" in saved["model"] and "decoder.0.weight" in saved["model"]

    # --eval of the pre-training checkpoint: the same reconstruction loss as the run's last epoch
    code, out = _run(_pretrain_args(small_data, tmp_path, "--tag", "ev", "--eval", "--resume", str(ckpt)), capsys)
    assert code == 0, out[-3000:]
    assert RECON_LINE.findall(out) == [epochs[-1]]

    # the picture: original / masked / prediction / pasted, from the checkpoint alone
    png = tmp_path / "recon.png"
    script = [sys.executable, str(ROOT / "scripts" / "simmim_reconstruct.py"), "--resume", str(ckpt)]
    done = subprocess.run([*script, "--count", "3", "--out", str(png)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"3 images, masked-pixel L1 [\d.]+; wrote", done.stdout)
    with Image.open(png) as im:
        assert im.size[0] > 4 * 100 and im.size[1] > 3 * 100  # 4 columns, 3 rows
    supervised = tmp_path / "sup.pth"
    torch.save({"model": {}, "config": "MODEL:\n  TYPE: swin\n"}, supervised)
    done = subprocess.run([*script[:-1], str(supervised)], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a SimMIM pre-training checkpoint" in done.stderr

    # fine-tuning: the encoder loads into a classifier, decoder and mask token dropped and reported
    config = get_config(SWIN_DEMO, ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1,2,4,8]"])
    model = build_model(config)
    report = load_pretrained(model, str(ckpt))
    assert sorted(report.dropped) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    assert report.unexpected == [] and report.head == "re-initialised"
    assert torch.equal(model.patch_embed.proj.weight, saved["model"]["encoder.patch_embed.proj.weight"])
    fc2 = saved["model"]["encoder.layers.2.blocks.1.mlp.fc2.weight"]
    assert torch.equal(model.layers[2].blocks[1].mlp.fc2.weight, fc2)


def test_pretraining_on_from_a_simmim_checkpoint_keeps_its_learned_mask_token(tmp_path):
    """--pretrained in SimMIM pre-training loads into the encoder, which has a mask token: the
    learned one comes in (fine-tuning a classifier drops it, above); the decoder stays new."""
    config = get_config(SIMMIM_DEMO, TINY)
    source = build_model(config)
    with torch.no_grad():
        source.encoder.mask_token.fill_(0.5)
    path = tmp_path / "pt.pth"
    torch.save({"model": source.state_dict()}, path)
    model = build_model(config)
    report = load_pretrained(model.encoder, str(path))
    assert torch.equal(model.encoder.mask_token, source.encoder.mask_token)
    assert sorted(report.dropped) == ["decoder.0.bias", "decoder.0.weight"] and report.missing == []


def test_window_6_pretraining_tables_are_resized_for_window_7_fine_tuning(tmp_path):
    """The released V1 route: pre-train at 192 window 6, fine-tune at 224 window 7."""
    pt = get_config(SIMMIM_DEMO, [*TINY, "MODEL.SWIN.WINDOW_SIZE", "3", "DATA.IMG_SIZE", "48"])
    simmim = build_model(pt)
    path = tmp_path / "pt.pth"
    torch.save({"model": simmim.state_dict()}, path)
    ft = get_config(SWIN_DEMO, [*TINY, "MODEL.SWIN.WINDOW_SIZE", "4", "MODEL.NUM_CLASSES", "10"])
    model = build_model(ft)
    report = load_pretrained(model, str(path))
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert table in report.resized and model.state_dict()[table].shape[0] == (2 * 4 - 1) ** 2
    source = simmim.state_dict()["encoder." + table]  # (5x5, heads) -> (7x7, heads), geometric
    expected = _release_geometric_resize(source, 7)
    torch.testing.assert_close(model.state_dict()[table], expected, atol=1e-5, rtol=0)
    bicubic = F.interpolate(source.T.reshape(1, -1, 5, 5), size=(7, 7), mode="bicubic", align_corners=False)
    assert not torch.allclose(model.state_dict()[table], bicubic.reshape(-1, 49).T, atol=1e-3)


def _release_geometric_resize(table: torch.Tensor, s_new: int) -> torch.Tensor:
    """The release's SimMIM fine-tuning resize, computed another way: q from the polynomial's
    root (clipped to the release's search interval), and the interpolating bicubic spline as two
    one-dimensional not-a-knot cubic splines (FITPACK's s=0 interpolant on a grid is their tensor
    product), read at the target offsets clipped to the source's span (FITPACK clamps)."""
    from scipy.interpolate import CubicSpline

    rows, heads = table.shape
    s_old = int(round(rows**0.5))
    n, target = s_old // 2, s_new // 2
    roots = np.roots([1.0] * (n - 1) + [1.0 - target])  # q^(n-1) + ... + q + 1 - target = 0
    q = min(max(float(roots[(abs(roots.imag) < 1e-9) & (roots.real > 0)].real.max()), 1.01), 1.5)
    half = np.array([sum(q**j for j in range(i + 1)) for i in range(n)])
    src = np.concatenate([-half[::-1], [0.0], half])
    dst = np.clip(np.arange(-target, target + 1, dtype=float), src[0], src[-1])
    out = []
    for h in range(heads):
        z = table[:, h].double().numpy().reshape(s_old, s_old)
        out.append(CubicSpline(src, CubicSpline(src, z, axis=1)(dst), axis=0)(dst).reshape(-1))
    return torch.tensor(np.stack(out, axis=1), dtype=table.dtype)


def test_the_swin_b_simmim_route_window_6_to_7_keeps_the_near_offsets_and_stretches_the_far_ones():
    """Swin-B pre-trained at window 6 (11x11 offsets), fine-tuned at 7 (13x13): q = 1.0913; the
    offsets 0 and ±1 sit at their own places, so the centre 3x3 of every head is kept exactly,
    and the rest agrees with the release's construction computed independently."""
    from models.pretrained import geometric_ratio, resize_relative_position_bias_table_geometric

    q = geometric_ratio(5, 6)  # 1 + q + q² + q³ + q⁴ = 6
    assert q == pytest.approx(1.0913, abs=1e-4) and sum(q**j for j in range(5)) == pytest.approx(6, abs=1e-5)
    table = torch.randn(11 * 11, 4)
    resized = resize_relative_position_bias_table_geometric(table, 13 * 13)
    assert resized.shape == (169, 4)
    centre = lambda t, s: t.T.reshape(4, s, s)[:, s // 2 - 1 : s // 2 + 2, s // 2 - 1 : s // 2 + 2]  # noqa: E731
    torch.testing.assert_close(centre(resized, 13), centre(table, 11), atol=1e-5, rtol=0)
    # The release's bisection stops within 1e-6 of q: the far offsets move by up to ~1e-5.
    torch.testing.assert_close(resized, _release_geometric_resize(table, 13), atol=3e-4, rtol=0)


def test_a_supervised_checkpoint_keeps_the_bicubic_resize_of_the_releases_224_to_384_fine_tuning(tmp_path):
    source = build_model(get_config(SWIN_DEMO, [*TINY, "MODEL.SWIN.WINDOW_SIZE", "3", "DATA.IMG_SIZE", "48"]))
    path = tmp_path / "sup.pth"
    torch.save({"model": source.state_dict()}, path)
    model = build_model(get_config(SWIN_DEMO, [*TINY, "MODEL.SWIN.WINDOW_SIZE", "4", "MODEL.NUM_CLASSES", "10"]))
    load_pretrained(model, str(path))
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    grid = source.state_dict()[table].T.reshape(1, -1, 5, 5)
    expected = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False).reshape(-1, 49).T
    torch.testing.assert_close(model.state_dict()[table], expected, atol=1e-6, rtol=0)


def test_a_simmim_checkpoint_of_another_family_is_refused_in_one_line(tmp_path):
    v2 = get_config(
        str(ROOT / "configs" / "demo" / "swinv2_demo_digits.yaml"),
        ["TRAIN.PRETRAIN", "simmim", "DATA.MASK_PATCH_SIZE", "8", "MODEL.SWINV2.EMBED_DIM", "16"]
        + ["MODEL.SWINV2.NUM_HEADS", "[1,2,4,8]"],
    )
    path = tmp_path / "v2_simmim.pth"
    torch.save({"model": build_model(v2).state_dict()}, path)
    model = build_model(get_config(SWIN_DEMO, TINY))
    with pytest.raises(UserError) as e:
        load_pretrained(model, str(path))
    assert "Swin V2" in str(e.value) and "\n" not in str(e.value)


def test_pretraining_reads_any_folder_of_images_and_refuses_an_empty_one(small_data, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(Path(small_data, "train").rglob("*.png"))[:32]):
        shutil.copy(path, flat / f"img{i}.png")
    args = _pretrain_args(str(flat), tmp_path, "--pretrain", "simmim", "--tag", "flat", opts=("TRAIN.EPOCHS", "1"))
    code, out = _run(args, capsys)
    assert code == 0, out[-3000:]
    assert "32 train / 0 val images" in out and "Train: [0/1]" in out

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    code, out = _run(_pretrain_args(str(empty), tmp_path, "--pretrain", "simmim", "--tag", "empty"), capsys)
    assert code != 0
    assert re.search(r"holds no images .* for SimMIM pre-training", out)


def test_a_mask_patch_that_does_not_fit_the_image_is_one_line_naming_sizes_that_work(small_data, tmp_path, capsys):
    args = _pretrain_args(small_data, tmp_path, "--pretrain", "simmim", opts=("DATA.MASK_PATCH_SIZE", "12"))
    code, out = _run(args, capsys)
    assert code != 0
    line = next(x for x in out.splitlines() if "MASK_PATCH_SIZE 12" in x)
    assert "DATA.IMG_SIZE 32 is not divisible by DATA.MASK_PATCH_SIZE 12" in line and "e.g." in line


@pytest.mark.slow
def test_two_gloo_ranks_pretrain_and_their_reconstruction_loss_is_what_one_process_measures(small_data, tmp_path):
    """DDP trains the loss-returning model; evaluation masks are seeded per image, so the
    figure two ranks report for a checkpoint is the one a single process reports for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    common = _pretrain_args(small_data, tmp_path, "--pretrain", "simmim", opts=("TRAIN.EPOCHS", "1"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [*launcher, str(ROOT / "main.py"), *common, "--tag", "ddp"], env=env, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ddp_line = RECON_LINE.findall(two.stdout + two.stderr)
    assert len(ddp_line) == 1 and ddp_line[0][1] == "15"
    run_dir = tmp_path / "simmim_demo_digits" / "ddp"
    assert "world size 2" in (run_dir / "log_rank0.txt").read_text()
    ckpt = run_dir / "ckpt_epoch_0.pth"
    one = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *common, "--tag", "one", "--eval", "--resume", str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert RECON_LINE.findall(one.stdout + one.stderr) == ddp_line


def test_pretraining_reads_the_release_zip_layout_with_the_same_images_and_masks_as_folders(small_data, tmp_path):
    from data import build_loader
    from data.zip_dataset import map_path, write_zip_split, zip_path

    root = tmp_path / "zipped"
    shutil.copytree(small_data, root)
    classes = sorted(os.listdir(root / "train"))
    for split in ("train", "val"):
        write_zip_split(
            str(root / split),
            zip_path(str(root), split),
            map_path(str(root), split),
            {c: i for i, c in enumerate(classes)},
        )
    opts = [*TINY, "DATA.DATA_PATH", str(root)]
    folders = build_loader(get_config(SIMMIM_DEMO, opts), 1, 0)
    zipped = build_loader(get_config(SIMMIM_DEMO, [*opts, "DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", "no"]), 1, 0)
    assert len(zipped.dataset_train) == len(folders.dataset_train) == 80
    (a_img, a_mask), _ = float_images(next(iter(folders.loader_train)))
    (b_img, b_mask), _ = float_images(next(iter(zipped.loader_train)))
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    (a_img, a_mask), _ = next(iter(folders.loader_val))
    (b_img, b_mask), _ = next(iter(zipped.loader_val))
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)


def test_a_v2_encoder_with_the_normalised_target_trains_and_its_mask_token_gets_gradients():
    config = get_config(
        str(ROOT / "configs" / "demo" / "swinv2_demo_digits.yaml"),
        ["TRAIN.PRETRAIN", "simmim", "DATA.MASK_PATCH_SIZE", "8", "MODEL.SWINV2.EMBED_DIM", "16"]
        + ["MODEL.SWINV2.NUM_HEADS", "[1,2,4,8]", "MODEL.SIMMIM.NORM_TARGET.ENABLE", "True"]
        + ["MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE", "7"],
    )
    model = build_model(config)
    assert model.norm_target and model.norm_target_window == 7
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    masks = torch.stack([torch.from_numpy(MaskGenerator(32, 8, 2, 0.6)()) for _ in range(4)])
    loss = model(images, masks)
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.mask_token.grad.abs().sum() > 0
    # the target really is the normalised image: the loss against it, not against raw pixels
    with torch.no_grad():
        prediction = model.reconstruct(images, masks)
        expected = masked_l1_loss(normalise_targets(images, 7), prediction, pixel_mask(masks, 2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_reconstruction_script_refuses_a_missing_or_unreadable_image_in_one_line(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("simmim_reconstruct", ROOT / "scripts" / "simmim_reconstruct.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(UserError, match=r"--images .*missing\.png does not exist"):
        script.choose_images([str(tmp_path / "missing.png")], "", 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    model = build_model(get_config(SIMMIM_DEMO, TINY)).eval()
    with pytest.raises(UserError, match=rf"cannot read image {re.escape(str(bad))} \("):
        script.reconstruct(model, get_config(SIMMIM_DEMO, TINY), [str(bad)], seed=0)
