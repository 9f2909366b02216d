"""Data package: transforms, datasets and their errors, unreadable images, samplers, loaders, demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import float_images, read_sample
from PIL import Image, ImageFile
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DistributedSampler
from torchvision import transforms

from config import get_config
from data import ExactEvalSampler, ResumableSampler, build_dataset, build_loader, build_transform
from data.robust import UnreadableImageError, load_rgb, unreadable_names
from errors import UserError

REPO = Path(__file__).resolve().parents[1]
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def cfg(*opts):
    """A frozen config with small, fast defaults (no mixup, no workers) plus ``opts``."""
    base = ["DATA.NUM_WORKERS", "0", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "DATA.BATCH_SIZE", "2"]
    return get_config(opts=base + [str(o) for o in opts])


def save_image(path: Path, seed: int, size=(16, 12), fmt="PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)


def make_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """``layout`` = {split: {class: n_images}}; writes n random PNGs per class folder."""
    seed = 0
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                save_image(root / split / cls / f"{i}.png", seed)
                seed += 1
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# -----------------------------------------------------------------------------
# Transforms
# -----------------------------------------------------------------------------
def bordered_image(side: int, border: int) -> Image.Image:
    """Green square with a red frame ``border`` pixels wide."""
    a = np.zeros((side, side, 3), dtype=np.uint8)
    a[..., 0] = 255
    a[border:-border, border:-border] = (0, 255, 0)
    return Image.fromarray(a)


def test_val_transform_with_crop_cuts_the_border_away():
    # Short side 256 (no resize needed), center crop 224 drops the 16-pixel red frame.
    out = build_transform(False, cfg("TEST.CROP", "True"))(bordered_image(256, 16))
    assert out.shape == (3, 224, 224)
    rgb = unnormalize(out)
    assert torch.allclose(rgb[:, 2:-2, 2:-2], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), atol=1e-3)


def test_val_transform_without_crop_keeps_the_border():
    out = build_transform(False, cfg("TEST.CROP", "False"))(bordered_image(256, 16))
    assert out.shape == (3, 224, 224)
    corner = unnormalize(out)[:, 0, 0]
    assert torch.allclose(corner, torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)


@pytest.mark.parametrize("crop", ["True", "False"])
def test_val_transform_gives_square_output_for_non_square_input(crop):
    img = Image.new("RGB", (300, 200), (10, 20, 30))
    out = build_transform(False, cfg("TEST.CROP", crop, "DATA.IMG_SIZE", "96"))(img)
    assert out.shape == (3, 96, 96)
    assert torch.allclose(unnormalize(out)[:, 48, 48], torch.tensor([10, 20, 30]) / 255.0, atol=1e-3)


def test_val_transform_of_small_images_leaves_a_same_size_image_unchanged():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = build_transform(False, cfg("TEST.CROP", "True", "DATA.IMG_SIZE", "32"))(img)
    expected = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(transforms.ToTensor()(img))
    assert torch.allclose(out, expected, atol=1e-6)


def test_train_transform_for_small_images_pads_and_crops_instead_of_resized_crop():
    t = build_transform(True, cfg("DATA.IMG_SIZE", "32"))
    crops = [s for s in t.transforms if isinstance(s, transforms.RandomCrop)]
    assert len(crops) == 1 and crops[0].size == (32, 32) and crops[0].padding == 4
    assert not any(isinstance(s, RandomResizedCropAndInterpolation) for s in t.transforms)
    out = float_images(t(Image.new("RGB", (32, 32), (200, 100, 50))))
    assert out.shape == (3, 32, 32)


def test_train_transform_keeps_resized_crop_for_large_images():
    t = build_transform(True, cfg("DATA.IMG_SIZE", "64"))
    rrc = [s for s in t.transforms if isinstance(s, RandomResizedCropAndInterpolation)]
    assert len(rrc) == 1 and rrc[0].size == (64, 64)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m10-mstd0-inc1"])
def test_train_transform_survives_300_random_images(policy):
    # Magnitude 10 drives timm's PosterizeIncreasing to 0 bits, which Pillow 13 rejects.
    t = build_transform(True, cfg("DATA.IMG_SIZE", "32", "AUG.AUTO_AUGMENT", policy))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for _ in range(300):
        img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        out = float_images(t(img))
        assert out.shape == (3, 32, 32)
        assert torch.isfinite(out).all()


def test_unknown_interpolation_raises_one_line_user_error():
    with pytest.raises(UserError) as err:
        build_transform(False, cfg("DATA.INTERPOLATION", "cubic"))
    assert "DATA.INTERPOLATION" in assert_one_line(err)


def test_malformed_auto_augment_policy_raises_one_line_user_error():
    with pytest.raises(UserError) as err:
        build_transform(True, cfg("AUG.AUTO_AUGMENT", "autoaug-typo"))
    assert "AUG.AUTO_AUGMENT" in assert_one_line(err)


# -----------------------------------------------------------------------------
# Datasets and their errors
# -----------------------------------------------------------------------------
def test_image_folder_dataset_yields_image_target_and_no_replacement(tmp_path):
    root = make_folder(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    ds, num_classes = build_dataset(True, cfg("DATA.DATA_PATH", root, "DATA.IMG_SIZE", "32"))
    assert num_classes == 2 and ds.classes == ["cat", "dog"] and len(ds) == 5
    img, target, replaced = read_sample(ds, 4)
    assert img.shape == (3, 32, 32) and target == 1 and replaced == ""
    val, _ = build_dataset(False, cfg("DATA.DATA_PATH", root, "DATA.IMG_SIZE", "32"))
    assert len(val) == 2 and val.classes == ["cat", "dog"]


def test_hidden_folders_are_not_classes(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 1, ".ipynb_checkpoints": 1}, "val": {"a": 1}})
    ds, num_classes = build_dataset(True, cfg("DATA.DATA_PATH", root))
    assert ds.classes == ["a"] and num_classes == 1 and len(ds) == 1


@pytest.mark.parametrize("path", ["", "does/not/exist"])
def test_missing_data_path_raises_one_line_user_error(tmp_path, path):
    with pytest.raises(UserError) as err:
        build_dataset(True, cfg("DATA.DATA_PATH", str(tmp_path / path) if path else '""'))
    msg = assert_one_line(err)
    assert "--data-path" in msg and "train/ and val/" in msg


def test_missing_val_split_raises_one_line_user_error(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 1}})
    with pytest.raises(UserError) as err:
        build_dataset(True, cfg("DATA.DATA_PATH", root))
    assert str(root / "val") in assert_one_line(err)


def test_class_mismatch_names_the_differing_classes(tmp_path):
    root = make_folder(tmp_path, {"train": {"cat": 1, "dog": 1, "emu": 1}, "val": {"cat": 1, "fox": 1}})
    with pytest.raises(UserError) as err:
        build_dataset(False, cfg("DATA.DATA_PATH", root))
    msg = assert_one_line(err)
    assert "only in train/: dog, emu" in msg and "only in val/: fox" in msg


def test_split_without_class_folders_raises_one_line_user_error(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 1}})
    (root / "val").mkdir()
    save_image(root / "val" / "loose.png", 0)
    with pytest.raises(UserError) as err:
        build_dataset(True, cfg("DATA.DATA_PATH", root))
    assert "holds no class folders" in assert_one_line(err)


def test_class_folders_without_images_raise_one_line_user_error(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 2, "b": 1}, "val": {"a": 0, "b": 0}})
    (root / "val" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError) as err:
        build_dataset(False, cfg("DATA.DATA_PATH", root))
    assert "hold no images" in assert_one_line(err)


def test_unknown_dataset_kind_raises_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        build_dataset(True, cfg("DATA.DATASET", "cifar", "DATA.DATA_PATH", tmp_path))
    assert "DATA.DATASET" in assert_one_line(err)


# -----------------------------------------------------------------------------
# ImageNet-22K
# -----------------------------------------------------------------------------
def write_22k_lists(root: Path, train: list, val: list) -> None:
    (root / "ILSVRC2011fall_whole_map_train.txt").write_text(json.dumps(train))
    (root / "ILSVRC2011fall_whole_map_val.txt").write_text(json.dumps(val))


def test_imagenet22k_json_lists_load_with_official_labels(tmp_path):
    for i, rel in enumerate(["n01/a.png", "n01/b.png", "n77/c.png", "n99/d.png"]):
        save_image(tmp_path / "imgs" / rel, i)
    write_22k_lists(
        tmp_path,
        [["imgs/n01/a.png", 0], ["imgs/n01/b.png", 0], ["imgs/n77/c.png", 21840]],
        [["imgs/n99/d.png", 5]],
    )
    config = cfg("DATA.DATASET", "imagenet22K", "DATA.DATA_PATH", tmp_path, "DATA.IMG_SIZE", "32")
    train, num_classes = build_dataset(True, config)
    val, _ = build_dataset(False, config)
    assert num_classes == 21841 and len(train.classes) == 21841 and train.classes[5] == "5"
    assert len(train) == 3 and len(val) == 1
    img, target, replaced = read_sample(train, 2)
    assert img.shape == (3, 32, 32) and target == 21840 and replaced == ""
    assert val[0][1] == 5
    assert train.samples[0][0] == str(tmp_path / "imgs/n01/a.png")


def test_imagenet22k_uses_class_folders_when_present(tmp_path):
    root = make_folder(tmp_path, {"train": {"n01": 1, "n02": 1}, "val": {"n01": 1, "n02": 1}})
    ds, num_classes = build_dataset(True, cfg("DATA.DATASET", "imagenet22K", "DATA.DATA_PATH", root))
    assert num_classes == 21841 and ds.classes == ["n01", "n02"] and len(ds) == 2


def test_imagenet22k_label_out_of_range_raises_one_line_user_error(tmp_path):
    save_image(tmp_path / "a.png", 0)
    write_22k_lists(tmp_path, [["a.png", 21841]], [["a.png", 0]])
    with pytest.raises(UserError) as err:
        build_dataset(True, cfg("DATA.DATASET", "imagenet22K", "DATA.DATA_PATH", tmp_path))
    assert "label 21841" in assert_one_line(err)


def test_imagenet22k_without_lists_or_folders_raises_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        build_dataset(True, cfg("DATA.DATASET", "imagenet22K", "DATA.DATA_PATH", tmp_path))
    assert "ILSVRC2011fall_whole_map_train.txt" in assert_one_line(err)


# -----------------------------------------------------------------------------
# Unreadable images
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_image_is_replaced_by_the_next_sample_and_reported(tmp_path, fmt, ext):
    for i, cls in enumerate(["a", "a", "b"]):
        for split in ("train", "val"):
            save_image(tmp_path / split / cls / f"{i}.{ext}", i, size=(40, 40), fmt=fmt)
    broken = tmp_path / "val" / "a" / f"0.{ext}"
    truncate(broken)
    # The val transform is deterministic, so the stand-in can be compared; training substitutes.
    config = cfg("DATA.DATA_PATH", tmp_path, "DATA.IMG_SIZE", "40", "TEST.CROP", "False")
    ds, _ = build_dataset(False, config, substitute=True)
    img, target, replaced = read_sample(ds, 0)
    next_img, next_target, next_replaced = read_sample(ds, 1)
    assert replaced == str(broken) and next_replaced == ""
    assert target == next_target == 0
    assert torch.equal(img, next_img)


def test_replacement_wraps_around_to_the_first_sample(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    truncate(root / "val" / "b" / "0.png")
    ds, _ = build_dataset(False, cfg("DATA.DATA_PATH", root), substitute=True)
    img, target, replaced = read_sample(ds, 1)
    assert target == 0 and replaced.endswith(os.path.join("b", "0.png"))
    assert torch.equal(img, float_images(ds[0][0]))


def test_strict_mode_raises_one_line_user_error_naming_the_file(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 2}, "val": {"a": 2}})
    truncate(root / "train" / "a" / "1.png")
    ds, _ = build_dataset(True, cfg("DATA.DATA_PATH", root, "DATA.STRICT", "True"))
    assert read_sample(ds, 0)[2] == ""
    with pytest.raises(UserError) as err:
        ds[1]
    assert str(root / "train" / "a" / "1.png") in assert_one_line(err)


def test_strict_error_stays_one_line_when_raised_in_a_loader_worker(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    truncate(root / "val" / "b" / "0.png")
    bundle = build_loader(cfg("DATA.DATA_PATH", root, "DATA.STRICT", "True", "DATA.NUM_WORKERS", "1"), 1, 0)
    with pytest.raises(UnreadableImageError) as err:
        list(bundle.loader_val)
    msg = assert_one_line(err)
    assert msg.startswith("unreadable image ") and str(root / "val" / "b" / "0.png") in msg


def test_run_of_unreadable_images_beyond_the_try_limit_raises(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 2}, "val": {"a": 1}})
    for i in range(2):
        truncate(root / "train" / "a" / f"{i}.png")
    ds, _ = build_dataset(True, cfg("DATA.DATA_PATH", root))
    with pytest.raises(UserError) as err:
        ds[0]
    assert "all unreadable" in assert_one_line(err)


def test_val_set_never_substitutes_an_unreadable_image_it_marks_it_for_exclusion(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 1, "b": 1}, "val": {"a": 2, "b": 2}})
    broken = root / "val" / "a" / "1.png"
    broken.write_bytes(np.random.default_rng(0).bytes(300))  # not an image at all
    config = cfg("DATA.DATA_PATH", root, "DATA.IMG_SIZE", "16")
    ds, _ = build_dataset(False, config)
    img, target, replaced = read_sample(ds, 1)
    # No class and a blank stand-in, not the next sample: nothing here may be scored as it.
    assert replaced == str(broken) and target == -1
    assert img.shape == float_images(ds[0][0]).shape and not torch.equal(img, float_images(ds[2][0]))
    assert unnormalize(img).abs().max() < 1e-6
    # Batches keep every row; the placeholder's target says to drop it, the dataset's log names it
    # (marked in the loader's worker process, read in this one).
    loader_val = build_loader(
        cfg("DATA.DATA_PATH", root, "DATA.IMG_SIZE", "16", "DATA.NUM_WORKERS", "1"), 1, 0
    ).loader_val
    loader_val.dataset.replacements.clear()
    images, targets = next(iter(loader_val))
    assert targets.tolist() == [0, -1] and len(images) == 2
    assert unreadable_names(loader_val.dataset) == [str(broken)]
    # Training still substitutes.
    train, _ = build_dataset(True, config, substitute=None)
    assert train.substitute and not ds.substitute


def test_strict_val_set_names_the_file_and_says_evaluation_can_go_on_without_it(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 1}, "val": {"a": 2}})
    truncate(root / "val" / "a" / "0.png")
    ds, _ = build_dataset(False, cfg("DATA.DATA_PATH", root, "DATA.STRICT", "True"))
    with pytest.raises(UnreadableImageError) as err:
        ds[0]
    msg = assert_one_line(err)
    assert str(root / "val" / "a" / "0.png") in msg and "DATA.STRICT False to evaluate without it" in msg


def test_loader_rejects_truncated_files_even_if_pil_was_told_to_accept_them(tmp_path):
    path = tmp_path / "x.png"
    save_image(path, 0, size=(64, 64))
    truncate(path)
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(OSError):
            load_rgb(str(path))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


# -----------------------------------------------------------------------------
# Samplers
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("n,replicas,drop_last", [(10, 1, False), (10, 3, False), (10, 3, True), (2, 3, False)])
def test_resumable_sampler_matches_distributed_sampler(n, replicas, drop_last):
    for rank in range(replicas):
        ours = ResumableSampler(n, replicas, rank, seed=7, drop_last=drop_last)
        ref = DistributedSampler(range(n), replicas, rank, shuffle=True, seed=7, drop_last=drop_last)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


@pytest.mark.parametrize("replicas,k", [(1, 0), (1, 7), (1, 25), (3, 4), (3, 9)])
def test_resumable_sampler_start_index_continues_the_uninterrupted_order(replicas, k):
    for rank in range(replicas):
        full = ResumableSampler(25, replicas, rank, seed=3)
        full.set_epoch(2)
        order = list(full)
        resumed = ResumableSampler(25, replicas, rank, seed=3)
        resumed.set_epoch(2)
        resumed.set_start_index(k)
        assert len(resumed) == len(order) - k
        assert list(resumed) == order[k:]
        # The skip covered one pass only: the epoch replays in full afterwards.
        assert len(resumed) == len(order) and list(resumed) == order


def test_resumable_sampler_skip_armed_before_set_epoch_survives_it():
    sampler = ResumableSampler(20, 1, 0, seed=0)
    sampler.set_start_index(6)  # what build_loader does before the trainer's set_epoch
    sampler.set_epoch(4)
    ref = ResumableSampler(20, 1, 0, seed=0)
    ref.set_epoch(4)
    assert list(sampler) == list(ref)[6:]


def test_resumable_sampler_set_epoch_after_a_partial_pass_clears_the_skip():
    sampler = ResumableSampler(20, 1, 0, seed=0)
    sampler.set_start_index(6)
    it = iter(sampler)
    next(it)
    sampler.set_epoch(1)
    assert len(sampler) == 20 and len(list(sampler)) == 20


def test_resumable_sampler_epochs_differ_and_repeat_with_the_seed():
    a = ResumableSampler(50, 1, 0, seed=0)
    b = ResumableSampler(50, 1, 0, seed=0)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        orders.append(list(a))
        assert orders[-1] == list(b)
        assert sorted(orders[-1]) == list(range(50))
    assert orders[0] != orders[1] != orders[2] != orders[0]


def test_resumable_sampler_start_index_beyond_the_epoch_raises_user_error():
    sampler = ResumableSampler(10, 2, 0)
    sampler.set_start_index(5)  # exactly at the end: an empty remainder is fine
    assert len(sampler) == 0 and list(sampler) == []
    with pytest.raises(UserError):
        sampler.set_start_index(6)


@pytest.mark.parametrize("n", [7, 11])
@pytest.mark.parametrize("replicas", [2, 3])
def test_exact_eval_sampler_covers_each_index_exactly_once(n, replicas):
    shares = [list(ExactEvalSampler(n, replicas, r)) for r in range(replicas)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(n))
    sizes = [len(ExactEvalSampler(n, replicas, r)) for r in range(replicas)]
    assert sizes == [len(s) for s in shares] and max(sizes) - min(sizes) <= 1


# -----------------------------------------------------------------------------
# Loaders
# -----------------------------------------------------------------------------
@pytest.fixture
def tiny_root(tmp_path):
    return make_folder(tmp_path, {"train": {"a": 5, "b": 5}, "val": {"a": 2, "b": 1}})


def test_build_loader_batches_classes_and_does_not_touch_the_config(tiny_root):
    config = cfg("DATA.DATA_PATH", tiny_root, "DATA.IMG_SIZE", "32", "DATA.BATCH_SIZE", "4")
    before = config.dump()
    bundle = build_loader(config, 1, 0)
    assert config.dump() == before
    assert bundle.num_classes == 2 and bundle.class_names == ["a", "b"] and bundle["num_classes"] == 2
    assert bundle.mixup_fn is None
    train_batches = list(bundle.loader_train)
    assert len(train_batches) == 2  # 10 images, batch 4, drop_last
    images, targets = float_images(train_batches[0][0]), train_batches[0][1]
    assert images.shape == (4, 3, 32, 32) and targets.dtype == torch.int64
    assert bundle.loader_train.dataset.replacements.indices() == []
    val_sizes = [len(b[0]) for b in bundle.loader_val]
    assert val_sizes == [3]


def test_build_loader_start_index_resumes_at_the_next_batch(tiny_root):
    config = cfg("DATA.DATA_PATH", tiny_root, "DATA.BATCH_SIZE", "2", "DATA.IMG_SIZE", "32")
    full = build_loader(config, 1, 0)
    full.sampler_train.set_epoch(1)
    order = list(full.sampler_train)
    resumed = build_loader(config, 1, 0, train_start_index=4)
    resumed.sampler_train.set_epoch(1)  # the trainer's per-epoch call keeps the armed skip
    assert len(resumed.loader_train) == 3
    assert list(resumed.sampler_train) == order[4:]


def _epoch_images(config, epoch: int, start_index: int = 0) -> torch.Tensor:
    bundle = build_loader(config, 1, 0, train_start_index=start_index)
    bundle.sampler_train.set_epoch(epoch)
    return torch.cat([float_images(images) for images, _ in bundle.loader_train])


def test_training_augmentation_is_the_same_with_any_worker_count_and_after_a_mid_epoch_resume(tiny_root):
    # RandAugment + random crop/flip + random erasing: torch, Python and NumPy RNGs all drawn.
    aug = [
        "DATA.DATA_PATH",
        tiny_root,
        "DATA.BATCH_SIZE",
        "2",
        "DATA.IMG_SIZE",
        "32",
        "AUG.REPROB",
        "0.5",
        "AUG.AUTO_AUGMENT",
        "rand-m9-mstd0.5-inc1",
    ]
    no_workers = _epoch_images(cfg(*aug), epoch=1)
    torch.manual_seed(123)  # the caller's RNG state must not matter either
    two_workers = _epoch_images(cfg(*aug, "DATA.NUM_WORKERS", "2"), epoch=1)
    resumed = _epoch_images(cfg(*aug, "DATA.NUM_WORKERS", "2"), epoch=1, start_index=4)
    assert no_workers.shape == (10, 3, 32, 32)
    assert torch.equal(no_workers, two_workers)
    assert torch.equal(resumed, no_workers[4:])
    # Still random: another epoch draws other augmentations of the same images.
    assert not torch.equal(_epoch_images(cfg(*aug), epoch=2).sort(0).values, no_workers.sort(0).values)


def test_a_seeded_sample_leaves_the_callers_rng_streams_where_they_were(tiny_root):
    import random

    bundle = build_loader(cfg("DATA.DATA_PATH", tiny_root, "DATA.IMG_SIZE", "32", "AUG.REPROB", "1.0"), 1, 0)
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    first = float_images(bundle.dataset_train[(3, 99)][0])
    draws = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    assert torch.equal(float_images(bundle.dataset_train[(3, 99)][0]), first)
    assert draws == (torch.rand(1).item(), random.random(), np.random.rand())
    assert not torch.equal(float_images(bundle.dataset_train[(3, 100)][0]), first)


def test_sample_seeds_depend_on_seed_epoch_and_global_position_only():
    from data.sample_seeds import sample_seed

    seeds = {sample_seed(0, e, p) for e in range(4) for p in range(1000)}
    assert len(seeds) == 4000 and all(0 <= s < 2**32 for s in seeds)
    assert sample_seed(0, 1, 5) == sample_seed(0, 1, 5) != sample_seed(1, 1, 5)
    # Rank r's i-th sample sits at global position i * world + r, also after a skip.
    ranks = [ResumableSampler(10, 2, r, seed=3, sample_seeds=True) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    items = [list(s) for s in ranks]
    assert items[1][2] == (ranks[1].epoch_indices()[2], sample_seed(3, 2, 2 * 2 + 1))
    ranks[1].set_start_index(2)
    assert list(ranks[1]) == items[1][2:]


def test_build_loader_splits_val_exactly_across_ranks(tiny_root):
    config = cfg("DATA.DATA_PATH", tiny_root, "DATA.BATCH_SIZE", "2")
    seen = [i for rank in range(2) for i in build_loader(config, 2, rank).sampler_val]
    assert sorted(seen) == [0, 1, 2]


def test_mixup_fn_uses_the_dataset_classes_and_label_smoothing(tiny_root):
    config = cfg("DATA.DATA_PATH", tiny_root, "AUG.MIXUP", "0.8", "MODEL.LABEL_SMOOTHING", "0.2")
    mixup = build_loader(config, 1, 0).mixup_fn
    assert mixup is not None and mixup.num_classes == 2 and mixup.label_smoothing == 0.2
    x, y = mixup(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
    assert y.shape == (2, 2) and torch.allclose(y.sum(1), torch.ones(2))


def test_odd_batch_with_mixup_raises_one_line_user_error(tiny_root):
    with pytest.raises(UserError) as err:
        build_loader(cfg("DATA.DATA_PATH", tiny_root, "AUG.CUTMIX", "1.0", "DATA.BATCH_SIZE", "3"), 1, 0)
    assert "even" in assert_one_line(err)


def test_zero_batch_size_raises_one_line_user_error(tiny_root):
    with pytest.raises(UserError) as err:
        build_loader(cfg("DATA.DATA_PATH", tiny_root, "DATA.BATCH_SIZE", "0"), 1, 0)
    assert "DATA.BATCH_SIZE" in assert_one_line(err)


def test_batch_larger_than_train_share_raises_one_line_user_error(tiny_root):
    # 10 images over 2 processes is 5 per process: a batch of 6 would never fill.
    with pytest.raises(UserError) as err:
        build_loader(cfg("DATA.DATA_PATH", tiny_root, "DATA.BATCH_SIZE", "6"), 2, 0)
    assert "would yield no batch" in assert_one_line(err)


# -----------------------------------------------------------------------------
# Demo data
# -----------------------------------------------------------------------------
def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_demo_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_prepare_demo_data_writes_1797_images_in_a_stratified_split(tmp_path):
    out = tmp_path / "demo"
    first = run_prepare("--out", str(out), "--size", "24")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"wrote 1437 train and 360 val images (10 classes, 24x24 RGB PNG) to {out}"
    counts = {s: {d: len(os.listdir(out / s / str(d))) for d in range(10)} for s in ("train", "val")}
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 1797
    names = {s: {f for d in range(10) for f in os.listdir(out / s / str(d))} for s in ("train", "val")}
    assert not names["train"] & names["val"]
    for d in range(10):
        total = counts["train"][d] + counts["val"][d]
        assert abs(counts["val"][d] - 0.2 * total) <= 1  # stratified: each digit split 80/20
    img = Image.open(out / "val" / "0" / sorted(os.listdir(out / "val" / "0"))[0])
    assert img.mode == "RGB" and img.size == (24, 24)

    again = run_prepare("--out", str(out), "--size", "24")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_prepare_demo_data_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = run_prepare("--out", str(tmp_path))
    assert result.returncode == 2 and "not written by this script" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_prepare_demo_data_stopped_halfway_is_simply_run_again(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_demo_data", REPO / "scripts" / "prepare_demo_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    real, calls = script.to_image, []

    def stop_after_100(*args):
        calls.append(1)
        if len(calls) > 100:
            raise KeyboardInterrupt  # Ctrl-C halfway
        return real(*args)

    out = tmp_path / "demo"
    monkeypatch.setattr(script, "to_image", stop_after_100)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--out", str(out), "--size", "8"])
    monkeypatch.setattr(script, "to_image", real)
    assert script.main(["--out", str(out), "--size", "8"]) == 0
    assert "wrote 1437 train and 360 val images" in capsys.readouterr().out
    assert sum(len(os.listdir(out / s / str(d))) for s in ("train", "val") for d in range(10)) == 1797
    assert script.main(["--out", str(out), "--size", "8"]) == 0 and "nothing to do" in capsys.readouterr().out


def test_loader_workers_are_capped_at_the_machines_share_of_cores(caplog):
    import logging

    from data.build import loader_workers

    with caplog.at_level(logging.INFO, logger="data.build"):
        assert loader_workers(8, 1, cpus=2) == 2  # the release's default on a 2-core machine
    assert "DATA.NUM_WORKERS 8 capped to 2 per process: 2 CPU cores for 1 process(es)" in caplog.text
    assert loader_workers(8, 4, cpus=2) == 1  # never zero when workers were asked for
    assert loader_workers(8, 2, cpus=64) == 8  # enough cores: as asked
    assert loader_workers(0, 1, cpus=2) == 0  # loading in the main process stays so


# -----------------------------------------------------------------------------
# Allocator setting of the processes that transform images
# -----------------------------------------------------------------------------
def _two_class_folder(root: Path) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(root / split / c / f"{i}.png")


def test_loader_workers_keep_freed_memory_unless_switched_off(tmp_path):
    from data.build import _init_worker

    _two_class_folder(tmp_path)
    base = ["DATA.DATA_PATH", str(tmp_path), "DATA.BATCH_SIZE", "2", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"]
    on = build_loader(get_config(opts=base + ["DATA.NUM_WORKERS", "2"]), 1, 0)
    for fn in (on.loader_train.worker_init_fn, on.loader_val.worker_init_fn):
        assert fn.func is _init_worker and fn.keywords == {"retain_memory": True}
    assert len(list(on.loader_train)) == 2  # the workers start and run with it
    off = build_loader(get_config(opts=base + ["DATA.NUM_WORKERS", "2", "RETAIN_FREED_MEMORY", "False"]), 1, 0)
    for fn in (off.loader_train.worker_init_fn, off.loader_val.worker_init_fn):
        assert fn.func is _init_worker and fn.keywords == {"retain_memory": False}  # signals still left alone


def test_retaining_freed_memory_stops_the_page_faults_of_per_image_buffers():
    # In a child process, so this process's allocator stays as it is. Per image, four buffers of
    # 1-3 MB whose sizes vary from image to image, as decoding and resizing photos of different
    # sizes allocate them: with glibc's defaults the freed memory goes back to the OS and the next
    # image faults its pages in again.
    script = (
        "import resource, sys\n"
        "import numpy as np\n"
        "from allocator import retain_freed_memory\n"
        "if sys.argv[1] == 'retain': assert retain_freed_memory()\n"
        "def one(i):\n"
        "    buffers = [np.ones((1 << 20) * (1 + (i + k) % 3), np.uint8) for k in range(4)]\n"
        "    return sum(int(b[0]) for b in buffers)\n"
        "for i in range(5): one(i)\n"
        "start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for i in range(40): one(i)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    counts = {}
    for mode in ("defaults", "retain"):
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=root, capture_output=True, text=True, check=True)
        counts[mode] = int(out.stdout.split()[-1])
    assert counts["retain"] * 10 < counts["defaults"], counts


def test_large_blocks_mode_also_keeps_blocks_over_32_mib():
    # A CPU training step's activations exceed glibc's largest mmap threshold (32 MiB): only
    # large_blocks (benchmark.py --malloc keep) keeps them.
    script = (
        "import resource, sys, torch\n"
        "from allocator import retain_freed_memory\n"
        "mode = sys.argv[1]\n"
        "if mode != 'defaults': assert retain_freed_memory(large_blocks=mode == 'large')\n"
        "for _ in range(20): torch.ones(12 << 20).sum()\n"
        "start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10): torch.ones(12 << 20).sum()\n"  # 48 MiB each
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    counts = {}
    for mode in ("defaults", "thresholds", "large"):
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=root, capture_output=True, text=True, check=True)
        counts[mode] = int(out.stdout.split()[-1])
    # 10 x 48 MiB is about 123,000 pages when each buffer is mapped afresh (measured: 122,890 with
    # glibc's defaults and with the loader's thresholds). With large_blocks the heap grows for the
    # first few buffers (12,288 faults each; 3-8 of them, varying run to run and machine to
    # machine) until freed ones are reused, so after twenty warm-up buffers the measured ten fault
    # at most two buffers' worth (0 in 8 of 8 runs here).
    assert counts["large"] <= 2 * 12_288 < 100_000 < min(counts["defaults"], counts["thresholds"]), counts


def test_loader_workers_outlive_a_group_wide_sigterm_and_sigint_left_to_the_trainer(tmp_path):
    """torchrun's killpg, Slurm and Ctrl-C signal every process, loader workers too: they ignore
    it (the trainer finishes its step and saves), so the loader keeps delivering every batch."""
    import signal

    root = make_folder(tmp_path, {"train": {"a": 12, "b": 12}, "val": {"a": 2, "b": 2}})
    config = cfg("DATA.DATA_PATH", root, "DATA.IMG_SIZE", "32", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "2")
    loader = build_loader(config, 1, 0).loader_train
    it = iter(loader)
    next(it)
    pids = [w.pid for w in it._workers]
    for sig in (signal.SIGTERM, signal.SIGINT):  # sent by another process, as a launcher's are
        subprocess.run(["kill", f"-{sig.name[3:]}", *map(str, pids)], check=True)
    time.sleep(0.5)
    assert all(w.is_alive() for w in it._workers)
    assert sum(1 for _ in it) == len(loader) - 1
