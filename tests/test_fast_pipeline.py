"""The fast training pipeline (``DATA.PIPELINE fast``, data/fast_transforms.py) against timm's released one.

Same draws: crop boxes and interpolations equal timm's for fixed seeds, and every random generator
ends where the reference leaves it. Same pixels within tolerance: a crop resized by torch's uint8
kernel is within 2 grey levels of Pillow's (mean under 0.05), a crop decoded at reduced size within
the tolerance stated below; a transform without a random resized crop is bit-identical. Unreadable
files are still caught at load time.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import float_images, read_sample
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import functional as F

from config import get_config
from data import (
    build_dataset,
    build_loader,
    build_transform,
    fast_augment,
    fast_transforms,
    jpeg_region,
    native,
    pillow_ops,
)
from data.fast_transforms import (
    DecodedCrop,
    FastResizedCrop,
    FastTrainTransform,
    ToNormalizedTensor,
    decode_jpeg_pixels,
    resized_crop,
)
from data.robust import EncodedImage, UnreadableImageError, load_encoded, load_rgb
from data.sample_seeds import seeded_rngs
from data.uint8_batches import Uint8Image
from data.zip_dataset import map_path, write_zip_split, zip_path
from errors import UserError

# Mean absolute difference, in grey levels (0-255, before normalisation), between crops decoded at
# reduced size and the reference crops: on average over crops, and for any one crop. Measured on
# crops of the photos below (1000x750 and 2000x1500, output 224 and 192): 0.8-1.1 on average, at
# most 2.4 (bicubic vs bilinear on the same box, both used by timm's 'random' interpolation: 1.5, 2.5).
MEAN_TOLERANCE = 2.0
CROP_TOLERANCE = 3.0
# torch's antialiased uint8 resize against Pillow's, same box: largest difference for any pixel, and
# mean over a crop (measured over 400 random boxes, upscales included: 2 and 0.02, mostly 0).
RESIZE_MAX_DIFF = 2
RESIZE_MEAN_DIFF = 0.05


def cfg(*opts):
    base = ["DATA.NUM_WORKERS", "0", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "DATA.BATCH_SIZE", "2"]
    return get_config(opts=base + [str(o) for o in opts])


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


HAS_AVX2 = sys.platform == "linux" and os.uname().machine == "x86_64" and cpu_has_avx2()


def photo(width: int, height: int, index: int = 0) -> Image.Image:
    """A ``width`` x ``height`` crop of scikit-learn's sample photos, mirror-tiled (never upscaled)."""
    a = load_sample_image(("china.jpg", "flower.jpg")[index % 2])
    while a.shape[1] < width or a.shape[0] < height:
        a = np.concatenate([a, a[:, ::-1]], 1)
        a = np.concatenate([a, a[::-1]], 0)
    y, x = (index * 37) % (a.shape[0] - height + 1), (index * 53) % (a.shape[1] - width + 1)
    return Image.fromarray(np.ascontiguousarray(a[y : y + height, x : x + width]))


def write(img: Image.Image, path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def encoded(img: Image.Image, fmt: str = "JPEG") -> EncodedImage:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return EncodedImage(buf.getvalue(), "memory")


def pixels(x: torch.Tensor) -> torch.Tensor:
    """A normalised tensor back in grey levels."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (x * std + mean) * 255


# -----------------------------------------------------------------------------
# The switch
# -----------------------------------------------------------------------------
def test_the_switch_selects_the_released_timm_transform_or_the_fast_one():
    reference = build_transform(True, cfg("DATA.PIPELINE", "reference"))
    assert type(reference) is transforms.Compose
    assert isinstance(reference.transforms[0], RandomResizedCropAndInterpolation)
    fast = build_transform(True, cfg())
    assert isinstance(fast, FastTrainTransform)
    # It lists the steps it reproduces; evaluation is the same transform either way.
    assert [type(s) for s in fast.transforms] == [type(s) for s in reference.transforms]
    a, b = build_transform(False, cfg()), build_transform(False, cfg("DATA.PIPELINE", "reference"))
    assert repr(a) == repr(b)
    small = build_transform(True, cfg("DATA.IMG_SIZE", "32"))
    assert small.crop is None and isinstance(small.transforms[0], transforms.RandomCrop)


def test_unknown_pipeline_raises_one_line_user_error():
    with pytest.raises(UserError) as err:
        build_transform(True, cfg("DATA.PIPELINE", "turbo"))
    assert "DATA.PIPELINE" in str(err.value) and "\n" not in str(err.value)


# -----------------------------------------------------------------------------
# Same draws
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_crop_boxes_and_interpolations_equal_timms_for_fixed_seeds(interpolation):
    sizes = [(500, 375), (375, 500), (1000, 750), (2048, 1536), (120, 90), (640, 100), (64, 64)]
    for out in (224, 192, 64):
        rrc = RandomResizedCropAndInterpolation(out, interpolation=interpolation)
        fast = FastResizedCrop(rrc)
        for w, h in sizes:
            img = Image.new("RGB", (w, h))
            for seed in range(150):
                with seeded_rngs(seed):
                    box = rrc.get_params(img, rrc.scale, rrc.ratio)
                    interp = random.choice(rrc.interpolation) if interpolation == "random" else rrc.interpolation
                    after = random.random()
                with seeded_rngs(seed):
                    assert fast.draw(img) == (box, interp)
                    assert random.random() == after  # the stream continues where timm's does
    # The decode stage draws the same boxes from the file's header and leaves the global stream be.
    rrc = RandomResizedCropAndInterpolation(224, interpolation=interpolation)
    fast = FastResizedCrop(rrc)
    for w, h in [(1000, 750), (500, 375), (460, 1200)]:
        enc = encoded(Image.new("RGB", (w, h), (90, 120, 30)))
        for seed in range(40):
            with seeded_rngs(seed):
                box = rrc.get_params(Image.new("RGB", (w, h)), rrc.scale, rrc.ratio)
            state = random.getstate()
            assert fast.decode(EncodedImage(enc.data), seed).box == box
            assert random.getstate() == state


def generator_states() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


@pytest.mark.parametrize(
    "opts",
    [
        (),  # the recipe: RandAugment rand-m9-mstd0.5-inc1, erasing 0.25 'pixel', bicubic
        ("AUG.REPROB", "1.0", "AUG.RECOUNT", "3", "DATA.INTERPOLATION", "random"),
        ("AUG.AUTO_AUGMENT", "none", "AUG.COLOR_JITTER", "0.4", "AUG.REMODE", "rand"),
    ],
)
def test_fast_transform_makes_the_reference_draws_and_its_crops_stay_within_resize_tolerance(tmp_path, opts):
    # PNGs of every size, and JPEGs too small for a reduced decode at IMG_SIZE 64 (boxes under 160).
    for i in range(4):
        write(photo(300 - 40 * i, 220 + 30 * i, i), tmp_path / "train" / "a" / f"{i}.png", "PNG")
        write(photo(120, 90, i), tmp_path / "train" / "b" / f"{i}.jpg", "JPEG")
        write(photo(50, 50, i), tmp_path / "val" / "a" / f"{i}.png", "PNG")
        write(photo(50, 50, i), tmp_path / "val" / "b" / f"{i}.png", "PNG")
    base = ("DATA.DATA_PATH", tmp_path, "DATA.IMG_SIZE", "64", *opts)
    fast, _ = build_dataset(True, cfg(*base))
    ref, _ = build_dataset(True, cfg(*base, "DATA.PIPELINE", "reference"))
    assert isinstance(fast.transform, FastTrainTransform)
    # Only the crop's pixels differ: without RandAugment (whose thresholds magnify a one-level
    # difference), colour jitter and erasing, the tensors are within the resize tolerance.
    plain = ("AUG.AUTO_AUGMENT", "none", "AUG.COLOR_JITTER", "0.0", "AUG.REPROB", "0.0")
    fast_crop = build_transform(True, cfg(*base, *plain))
    ref_crop = build_transform(True, cfg(*base, *plain, "DATA.PIPELINE", "reference"))
    worst, means = 0.0, []
    for seed in range(12):
        for i in range(len(fast)):
            path, key = fast.samples[i][0], 1000 * seed + i
            decoded = fast.transform.decode_encoded(load_encoded(path), key)
            with seeded_rngs(key):
                a = float_images(fast.transform(decoded))
                after_fast = generator_states()
            with seeded_rngs(key):
                b = ref.transform(load_rgb(path))
                after_ref = generator_states()
            assert a.shape == b.shape and after_fast == after_ref, (i, seed)
            with seeded_rngs(key):
                x = pixels(float_images(fast_crop(load_encoded(path))))
            with seeded_rngs(key):
                y = pixels(ref_crop(load_rgb(path)))
            diff = (x - y).abs()
            worst, means = max(worst, diff.max().item()), means + [diff.mean().item()]
    assert worst <= RESIZE_MAX_DIFF + 0.01 and np.mean(means) < RESIZE_MEAN_DIFF
    assert max(means) < 10 * RESIZE_MEAN_DIFF


def test_a_transform_without_random_resized_crop_is_bit_identical_to_the_reference(tmp_path):
    for i in range(4):
        write(photo(30, 28, i), tmp_path / "train" / "ab"[i % 2] / f"{i}.png", "PNG")
        write(photo(30, 28, i), tmp_path / "val" / "ab"[i % 2] / f"{i}.png", "PNG")
    base = ("DATA.DATA_PATH", tmp_path, "DATA.IMG_SIZE", "32")  # pad-and-crop for small images
    fast, _ = build_dataset(True, cfg(*base))
    ref, _ = build_dataset(True, cfg(*base, "DATA.PIPELINE", "reference"))
    assert fast.transform.crop is None
    for seed in range(12):
        for i in range(len(fast)):
            a, b = fast[(i, 1000 * seed + i)], ref[(i, 1000 * seed + i)]
            assert torch.equal(float_images(a[0]), b[0]) and a[1:] == b[1:], (i, seed)


@pytest.mark.parametrize("interpolation", [F.InterpolationMode.BILINEAR, F.InterpolationMode.BICUBIC])
def test_torch_resize_of_a_crop_is_within_two_grey_levels_of_pillows(interpolation):
    rng = random.Random(0)
    means, worst, equal = [], 0, []
    for i in range(120):
        img = photo(rng.randint(40, 700), rng.randint(40, 450), i)
        h, w = rng.randint(1, img.height), rng.randint(1, img.width)
        box = (rng.randint(0, img.height - h), rng.randint(0, img.width - w), h, w)
        size = rng.choice([(224, 224), (192, 192), (64, 64), (32, 48)])
        reference = np.asarray(F.resized_crop(img, *box, list(size), interpolation), dtype=np.int16)
        got = resized_crop(img, box, size, interpolation)
        assert got.mode == "RGB" and got.size == (size[1], size[0])
        diff = np.abs(reference - np.asarray(got, dtype=np.int16))
        worst, means, equal = max(worst, diff.max()), means + [diff.mean()], equal + [(diff == 0).mean()]
    assert worst <= RESIZE_MAX_DIFF and np.mean(means) < RESIZE_MEAN_DIFF and np.mean(equal) > 0.99
    # Modes and interpolations the kernel does not cover take torchvision's own call, bit for bit.
    grey = photo(90, 70).convert("L")
    box = (3, 5, 60, 50)
    assert resized_crop(grey, box, (32, 32), interpolation).tobytes() == (
        F.resized_crop(grey, *box, [32, 32], interpolation).tobytes()
    )
    nearest = F.InterpolationMode.NEAREST
    rgb = photo(90, 70)
    assert resized_crop(rgb, box, (32, 32), nearest).tobytes() == F.resized_crop(rgb, *box, [32, 32], nearest).tobytes()
    tensor = F.pil_to_tensor(rgb)
    assert torch.equal(
        resized_crop(tensor, box, (32, 32), interpolation), F.resized_crop(tensor, *box, [32, 32], interpolation)
    )


def test_to_normalized_tensor_is_bit_identical_to_to_tensor_then_normalize():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    fused = ToNormalizedTensor(mean, std)
    rng = np.random.default_rng(0)
    for shape in [(224, 224, 3), (17, 31, 3)]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        assert torch.equal(fused(img), reference(img))
        assert fused(img).is_contiguous()
    grey = Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).convert("RGB").convert("L")
    assert torch.equal(fused(grey.convert("RGB")), reference(grey.convert("RGB")))
    tensor = torch.rand(3, 5, 5)
    assert torch.equal(fused(tensor), transforms.Normalize(mean, std)(tensor))


def test_training_batches_from_the_loader_match_the_reference_batches(tmp_path):
    for i in range(6):
        write(photo(200, 150, i), tmp_path / "train" / "ab"[i % 2] / f"{i}.png", "PNG")
        write(photo(40, 40, i), tmp_path / "val" / "ab"[i % 2] / f"{i}.png", "PNG")
    # The same samples, flips and crops; pixels within the resize tolerance (no RandAugment, whose
    # thresholds would magnify a one-level difference; its draws are checked above).
    opts = ("DATA.DATA_PATH", tmp_path, "DATA.IMG_SIZE", "64", "SEED", "4", "AUG.AUTO_AUGMENT", "none")
    fast = list(build_loader(cfg(*opts), 1, 0).loader_train)
    ref = list(build_loader(cfg(*opts, "DATA.PIPELINE", "reference"), 1, 0).loader_train)
    assert len(fast) == len(ref) == 3
    for (xa, ya), (xb, yb) in zip(fast, ref, strict=True):
        assert torch.equal(ya, yb)
        diff = (pixels(float_images(xa)) - pixels(xb)).abs()
        assert diff.max() <= RESIZE_MAX_DIFF + 0.01 and diff.mean() < RESIZE_MEAN_DIFF


# -----------------------------------------------------------------------------
# Reduced-size decoding
# -----------------------------------------------------------------------------
def test_large_crops_of_jpegs_decode_at_reduced_size_within_tolerance():
    rrc = RandomResizedCropAndInterpolation(224, interpolation="bicubic")
    fast = FastResizedCrop(rrc)
    scales, means = [], []
    for index in range(4):
        img = photo(1000, 750, index) if index < 3 else photo(2000, 1500, index)
        enc = encoded(img)
        full = EncodedImage(enc.data).decode()
        for seed in range(12):
            decoded = fast.decode(EncodedImage(enc.data), seed)
            top, left, h, w = decoded.box
            reference = F.resized_crop(full, top, left, h, w, [224, 224], decoded.interpolation)
            got = fast.crop(decoded)
            k = decoded.scale
            # Reduced exactly when the box is at least 1.25 k times the output on both sides.
            assert k == next((f for f in (8, 4, 2) if h >= 280 * f and w >= 280 * f), 1)
            # What was decoded is the part of the 1/k image that holds the scaled box (data.jpeg_region).
            image, (oy, ox) = decoded.image, decoded.origin
            width, height = (image.shape[2], image.shape[1]) if isinstance(image, torch.Tensor) else image.size
            assert 0 <= ox <= left / k and 0 <= oy <= top / k
            assert (left + w) / k <= ox + width <= -(-img.width // k)
            assert (top + h) / k <= oy + height <= -(-img.height // k)
            diff = np.abs(np.asarray(reference, dtype=np.int16) - np.asarray(got, dtype=np.int16))
            if k == 1:
                assert diff.max() <= RESIZE_MAX_DIFF
            else:
                scales.append(k)
                means.append(diff.mean())
                assert diff.mean() < CROP_TOLERANCE, (index, seed, k, diff.mean())
    assert 2 in scales and 4 in scales  # both reductions were exercised
    assert np.mean(means) < MEAN_TOLERANCE


def test_whole_fast_transform_stays_within_tolerance_on_reduced_decodes(tmp_path):
    # Without RandAugment (whose solarize/posterize/equalize thresholds magnify a one-level
    # difference), the final tensors differ only where the crop did, erasing rectangles included.
    config = ("AUG.AUTO_AUGMENT", "none", "AUG.COLOR_JITTER", "0.0", "AUG.REPROB", "0.5")
    fast = build_transform(True, cfg(*config))
    ref = build_transform(True, cfg(*config, "DATA.PIPELINE", "reference"))
    path = write(photo(1000, 750, 1), tmp_path / "x.jpg", "JPEG")
    reduced = 0
    for seed in range(10):
        decoded = fast.decode_encoded(load_encoded(str(path)), seed)
        reduced += decoded.scale > 1
        with seeded_rngs(seed):
            a = float_images(fast(decoded))
        with seeded_rngs(seed):
            b = ref(load_rgb(str(path)))
        erased = (a == b) & (b.abs() > 3)  # erasing noise is the same draw in both
        diff = (pixels(a) - pixels(b)).abs()
        assert diff.mean() < CROP_TOLERANCE and diff[~erased].mean() < CROP_TOLERANCE
    assert reduced >= 3


# -----------------------------------------------------------------------------
# Unreadable files
# -----------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_jpeg_is_still_unreadable_at_load_time_and_substituted(tmp_path):
    for i in range(3):
        write(photo(1000, 750, i), tmp_path / "train" / "a" / f"{i}.jpg", "JPEG")
        write(photo(40, 40, i), tmp_path / "val" / "a" / f"{i}.png", "PNG")
    broken = tmp_path / "train" / "a" / "0.jpg"
    truncate(broken)
    ds, _ = build_dataset(True, cfg("DATA.DATA_PATH", tmp_path))
    rrc = RandomResizedCropAndInterpolation(224)
    drafted = 0
    for seed in range(8):
        with seeded_rngs(seed):
            _, _, h, w = rrc.get_params(Image.new("RGB", (1000, 750)), rrc.scale, rrc.ratio)
        drafted += h >= 560 and w >= 560
        img, target, replaced = read_sample(ds, (0, seed))
        # The next sample under the same seed stands in, as with the reference pipeline.
        assert replaced == str(broken) and target == 0
        assert torch.equal(img, float_images(ds[(1, seed)][0]))
    assert 0 < drafted < 8  # both the reduced and the full decode met the truncated file
    strict, _ = build_dataset(True, cfg("DATA.DATA_PATH", tmp_path, "DATA.STRICT", "True"))
    with pytest.raises(UnreadableImageError) as err:
        strict[(0, 1)]
    assert str(broken) in str(err.value) and "\n" not in str(err.value)


def test_an_unidentifiable_file_fails_when_read_not_later():
    with pytest.raises(OSError):
        EncodedImage(b"not an image at all" * 10, "x.jpg")


def test_the_zip_reader_hands_undecoded_bytes_to_the_fast_transform(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            write(photo(1000, 750, i), tmp_path / split / "a" / f"{i}.jpg", "JPEG")
        write_zip_split(str(tmp_path / split), zip_path(str(tmp_path), split), map_path(str(tmp_path), split), {"a": 0})
    folder, _ = build_dataset(True, cfg("DATA.DATA_PATH", tmp_path))
    zipped, _ = build_dataset(True, cfg("DATA.DATA_PATH", tmp_path, "DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", "no"))
    assert zipped._decode_stage() is not None
    for seed in range(4):
        for i in range(3):
            assert torch.equal(float_images(folder[(i, seed)][0]), float_images(zipped[(i, seed)][0]))


def test_the_shard_reader_hands_undecoded_bytes_to_the_fast_transform(tmp_path):
    import importlib.util

    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            write(photo(1000, 750, i), tmp_path / split / "a" / f"{i}.jpg", "JPEG")
    spec = importlib.util.spec_from_file_location(
        "make_shards", Path(__file__).parents[1] / "scripts" / "make_shards.py"
    )
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    assert make_shards.main(["--data-path", str(tmp_path), "--out", str(tmp_path / "shards")]) == 0
    folder, _ = build_dataset(True, cfg("DATA.DATA_PATH", tmp_path))
    sharded, _ = build_dataset(True, cfg("DATA.DATA_PATH", tmp_path / "shards", "DATA.FORMAT", "shards"))
    calls = []
    decode = sharded.transform.decode_encoded
    sharded.transform.decode_encoded = lambda *a: calls.append(1) or decode(*a)
    for seed in range(4):
        for j in range(3):
            # The converter shuffles the training set; a member's key is its ImageFolder index.
            i = int(Path(sharded.sample_name(j)).stem)
            # Same crop, same reduced-size decode: equal to the pixel.
            assert torch.equal(float_images(folder[(i, seed)][0]), float_images(sharded[(j, seed)][0]))
    assert len(calls) == 12


def test_decoded_images_and_encoded_ones_are_both_accepted():
    fast = build_transform(True, cfg("DATA.IMG_SIZE", "64"))
    img = photo(100, 80)
    enc = encoded(img, "PNG")
    with seeded_rngs(3):
        a = float_images(fast(img))
    with seeded_rngs(3):
        b = float_images(fast(EncodedImage(enc.data)))
    decoded = fast.decode_encoded(EncodedImage(enc.data), 3)
    assert isinstance(decoded, DecodedCrop) and decoded.scale == 1
    with seeded_rngs(3):
        c = float_images(fast(decoded))
    assert torch.equal(a, b) and torch.equal(a, c)
    # An EncodedImage can be decoded more than once (each open() is a fresh, undrafted image).
    again = EncodedImage(enc.data)
    assert again.decode().tobytes() == again.decode().tobytes() == img.tobytes()


@pytest.mark.parametrize("mode,options", [("L", {}), ("CMYK", {}), ("RGB", {"progressive": True})])
def test_grey_cmyk_and_progressive_jpegs_decode_at_reduced_size_into_rgb(mode, options):
    buf = io.BytesIO()
    photo(1200, 900, 1).convert(mode).save(buf, "JPEG", quality=90, **options)
    fast = FastResizedCrop(RandomResizedCropAndInterpolation(224, interpolation="bicubic"))
    full = EncodedImage(buf.getvalue()).decode()
    assert full.mode == "RGB" and full.tobytes() == Image.open(io.BytesIO(buf.getvalue())).convert("RGB").tobytes()
    reduced = 0
    for seed in range(8):
        decoded = fast.decode(EncodedImage(buf.getvalue()), seed)
        top, left, h, w = decoded.box
        got = fast.crop(decoded)
        assert got.mode == "RGB" and got.size == (224, 224)
        reference = F.resized_crop(full, top, left, h, w, [224, 224], decoded.interpolation)
        diff = np.abs(np.asarray(reference, dtype=np.int16) - np.asarray(got, dtype=np.int16))
        assert diff.mean() < CROP_TOLERANCE
        reduced += decoded.scale > 1
    assert reduced > 0


def test_the_flip_goes_with_the_crop_with_torchvisions_draw_and_the_same_pixels():
    # Output 160 from a 300x200 JPEG: never a reduced decode, so only torch's resize differs.
    flip = transforms.RandomHorizontalFlip()
    reference = transforms.Compose(
        [RandomResizedCropAndInterpolation(160, interpolation="bicubic"), flip, transforms.PILToTensor()]
    )
    fast = FastTrainTransform(reference, uint8_output=False)
    assert fast.flip is flip and flip not in fast.steps
    data = encoded(photo(300, 200, 1)).data
    mirrored = 0
    for seed in range(16):
        with seeded_rngs(seed):
            a = fast(fast.decode_encoded(EncodedImage(data), seed)).int()
            after_fast = generator_states()
        with seeded_rngs(seed):
            b = reference(EncodedImage(data).decode()).int()
            after_ref = generator_states()
        with seeded_rngs(seed):
            mirror = bool(torch.rand(1) < flip.p)  # the flip's draw: the sample's first torch draw
        assert after_fast == after_ref
        assert (a - b).abs().max() <= RESIZE_MAX_DIFF, seed
        if mirror:
            assert (a - b.flip(-1)).abs().float().mean() > 10 * RESIZE_MEAN_DIFF  # it was flipped, not left
        mirrored += mirror
    assert 0 < mirrored < 16  # both outcomes of the draw were met


@pytest.mark.parametrize(
    "mode,options",
    [
        ("RGB", {"subsampling": 0}),  # 4:4:4
        ("RGB", {"subsampling": 1}),  # 4:2:2
        ("RGB", {"subsampling": 2}),  # 4:2:0, the common case
        ("RGB", {"progressive": True}),
        ("L", {}),
    ],
)
def test_torchvisions_jpeg_decode_gives_pillows_pixels_exactly(mode, options):
    buf = io.BytesIO()
    photo(333, 251, 2).convert(mode).save(buf, "JPEG", quality=87, **options)
    pixels = decode_jpeg_pixels(EncodedImage(buf.getvalue()))
    pillow = np.asarray(EncodedImage(buf.getvalue()).decode())
    assert pixels is not None and pixels.dtype == torch.uint8 and pixels.shape == (3, 251, 333)
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), pillow)


def test_torchvisions_decode_is_skipped_for_cmyk_png_and_data_it_refuses():
    cmyk, png = io.BytesIO(), io.BytesIO()
    photo(64, 48).convert("CMYK").save(cmyk, "JPEG")
    photo(64, 48).save(png, "PNG")
    assert decode_jpeg_pixels(EncodedImage(cmyk.getvalue())) is None
    assert decode_jpeg_pixels(EncodedImage(png.getvalue())) is None
    whole = encoded(photo(300, 200)).data
    truncated = EncodedImage(whole[: len(whole) // 2])
    assert decode_jpeg_pixels(truncated) is None  # Pillow's decode then decides: it raises
    with pytest.raises(OSError):
        truncated.decode()


def test_without_torchvisions_codecs_the_crop_decodes_with_pillow_to_the_same_image(monkeypatch):
    fast = FastResizedCrop(RandomResizedCropAndInterpolation(224, interpolation="bicubic"))
    data = encoded(photo(400, 300)).data
    monkeypatch.setattr(fast_transforms, "decode_region", lambda *args, **kwargs: None)  # no partial decoding
    with_torchvision = fast.crop(fast.decode(EncodedImage(data), 5))
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # importing it now raises ImportError
    assert decode_jpeg_pixels(EncodedImage(data)) is None
    decoded = fast.decode(EncodedImage(data), 5)
    assert isinstance(decoded.image, Image.Image)
    assert fast.crop(decoded).tobytes() == with_torchvision.tobytes()


def test_a_full_size_jpeg_crop_from_torchvisions_pixels_equals_the_one_from_pillows_image():
    fast = FastResizedCrop(RandomResizedCropAndInterpolation(224, interpolation="random"))
    data = encoded(photo(500, 375, 1)).data
    full = EncodedImage(data).decode()
    kinds = set()
    for seed in range(16):
        decoded = fast.decode(EncodedImage(data), seed)
        assert decoded.scale == 1 and isinstance(decoded.image, torch.Tensor)  # no box here reduces
        kinds.add(decoded.interpolation)
        got = fast.crop(decoded)
        want = resized_crop(full, decoded.box, (224, 224), decoded.interpolation)
        assert got.tobytes() == want.tobytes(), seed
    assert kinds == {F.InterpolationMode.BILINEAR, F.InterpolationMode.BICUBIC}


# -----------------------------------------------------------------------------
# Partial decoding: only the crop's part of a JPEG (data/jpeg_region.py)
# -----------------------------------------------------------------------------
JPEG_KINDS = [
    ("RGB", {"subsampling": 0}),  # 4:4:4
    ("RGB", {"subsampling": 1}),  # 4:2:2
    ("RGB", {"subsampling": 2}),  # 4:2:0, the common case
    ("RGB", {"progressive": True}),
    ("L", {}),
]


def jpeg_bytes(img: Image.Image, mode: str = "RGB", **options) -> bytes:
    buf = io.BytesIO()
    img.convert(mode).save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def test_the_c_helpers_are_built_on_this_machine():
    # CI's machine has a C compiler and libjpeg-turbo's headers; without them the fast pipeline
    # still works (whole decodes, Pillow's RandAugment ops), but this test says the speed-ups are off.
    assert jpeg_region.region_decoder() is not None, "see the warning logged by data.native for why"
    assert pillow_ops.ops_kernel() is not None, "see the warning logged by data.native for why"
    assert pillow_ops.fast_rotate_available() == HAS_AVX2


@pytest.mark.parametrize("mode,options", JPEG_KINDS)
def test_a_partially_decoded_box_equals_the_same_box_of_pillows_whole_decode(mode, options):
    # An odd size (MCU rows and columns cut at the edges) and every libjpeg scale.
    width, height = 613, 419
    data = jpeg_bytes(photo(width, height, 2), mode, **options)
    rng = random.Random(0)
    for scale in (1, 2, 4, 8):
        whole = Image.open(io.BytesIO(data))
        if scale > 1:
            whole.draft("RGB", (width // scale, height // scale))
        full = np.asarray(whole.convert("RGB"))
        assert full.shape[:2] == (-(-height // scale), -(-width // scale))
        boxes = [(0, 0, full.shape[0], full.shape[1]), (full.shape[0] - 1, full.shape[1] - 1, 1, 1)]
        for _ in range(25):
            h, w = rng.randint(1, full.shape[0]), rng.randint(1, full.shape[1])
            boxes.append((rng.randint(0, full.shape[0] - h), rng.randint(0, full.shape[1] - w), h, w))
        for top, left, h, w in boxes:
            got = jpeg_region.decode_region(data, (top, left, h, w), scale)
            assert got is not None and got.dtype == torch.uint8 and got.shape == (3, h, w)
            want = full[top : top + h, left : left + w]
            assert np.array_equal(got.permute(1, 2, 0).numpy(), want), (scale, (top, left, h, w))


def test_partial_decoding_declines_truncated_files_wherever_the_box_and_cmyk_and_boxes_outside():
    data = jpeg_bytes(photo(320, 240))
    assert jpeg_region.decode_region(data, (0, 0, 16, 16)) is not None
    # Cut off in its last rows: without its end marker even a box in the intact top half is declined.
    truncated = data[: len(data) * 3 // 4]
    assert jpeg_region.decode_region(truncated, (0, 0, 16, 16)) is None
    assert jpeg_region.decode_region(data[:100], (0, 0, 16, 16)) is None
    assert jpeg_region.decode_region(data + b"trailer", (0, 0, 16, 16)) is None  # decoded whole instead
    # Damage libjpeg warns about above the box's last row: declined (Pillow, which ignores warnings, decodes it).
    damaged = bytearray(data)
    damaged[len(data) // 3 : len(data) // 3 + 40] = b"\xff\xd3" * 20  # stray restart markers
    assert jpeg_region.decode_region(bytes(damaged), (200, 0, 40, 16)) is None
    assert jpeg_region.decode_region(jpeg_bytes(photo(64, 48), "CMYK"), (0, 0, 8, 8)) is None
    assert jpeg_region.decode_region(data, (0, 0, 241, 10)) is None
    assert jpeg_region.decode_region(data, (-1, 0, 10, 10)) is None
    assert jpeg_region.decode_region(data, (0, 0, 121, 10), 2) is None  # 240 / 2 rows at half scale
    # The crop stage then decodes whole (torchvision refuses it too) and Pillow's load raises.
    fast = FastResizedCrop(RandomResizedCropAndInterpolation(64, interpolation="bicubic"))
    with pytest.raises(OSError):
        fast.decode(EncodedImage(truncated), 0)


def with_luma_sampling(data: bytes, factors: int) -> bytes:
    """``data`` (a 4:2:0 baseline JPEG) with its luma sampling byte in the frame header replaced."""
    sof = data.index(b"\xff\xc0")
    luma = sof + 2 + 2 + 1 + 2 + 2 + 1 + 1  # marker, length, precision, height, width, count, component id
    assert data[luma] == 0x22
    return data[:luma] + bytes([factors]) + data[luma + 1 :]


def test_partial_decoding_declines_uncommon_sampling_layouts():
    # libjpeg-turbo 2.1 crops luma 4x2 and 2x4 files wrongly at 1/2 and 1/4 scale: only the common
    # layouts (chroma 1x1, luma up to 2x2) are decoded in part; the header alone decides.
    data = jpeg_bytes(photo(96, 64), subsampling=2)
    assert jpeg_region.decode_region(data, (0, 8, 16, 16)) is not None
    for factors in (0x42, 0x24, 0x41):  # luma 4x2, 2x4, 4x1
        assert jpeg_region.decode_region(with_luma_sampling(data, factors), (0, 8, 16, 16), 2) is None


def test_box_and_nearest_crops_decode_whole():
    for interpolation in ("box", "nearest"):
        fast = FastResizedCrop(RandomResizedCropAndInterpolation(64, interpolation=interpolation))
        decoded = fast.decode(EncodedImage(jpeg_bytes(photo(600, 450))), 1)
        assert decoded.origin == (0, 0) and isinstance(decoded.image, Image.Image)


def test_strict_data_decodes_every_jpeg_whole():
    strict = build_transform(True, cfg("DATA.STRICT", "True"))
    assert not strict.crop.partial and build_transform(True, cfg()).crop.partial
    decoded = strict.decode_encoded(EncodedImage(jpeg_bytes(photo(300, 200))), 1)
    assert decoded.origin == (0, 0) and decoded.image.shape == (3, 200, 300)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_crops_from_partially_decoded_jpegs_equal_crops_from_whole_decodes(monkeypatch, interpolation):
    # Full scale: torch's resize of the box. Reduced: Pillow's resize of the scaled box, which reads
    # a few pixels around it; the decoded part includes them, so the crop is the same.
    fast = FastResizedCrop(RandomResizedCropAndInterpolation(224, interpolation=interpolation))
    scales, decoded_share = set(), []
    for index, (width, height) in enumerate([(500, 375), (1000, 750), (2000, 1500)]):
        data = jpeg_bytes(photo(width, height, index))
        for seed in range(10):
            partial = fast.decode(EncodedImage(data), seed)
            assert isinstance(partial.image, torch.Tensor)
            decoded_share.append(partial.image[0].numel() * partial.scale**2 / (width * height))
            with monkeypatch.context() as m:
                m.setattr(fast_transforms, "decode_region", lambda *args, **kwargs: None)
                whole = fast.decode(EncodedImage(data), seed)
            assert whole.origin == (0, 0) and whole.box == partial.box and whole.scale == partial.scale
            scales.add(partial.scale)
            assert fast.crop(partial).tobytes() == fast.crop(whole).tobytes(), (width, seed, partial.scale)
    assert scales == {1, 2, 4}
    assert np.mean(decoded_share) < 0.7  # of the pixels a whole decode makes (about half, for these boxes)


def test_without_a_compiler_partial_decoding_is_off_with_one_log_line(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    jpeg_region.region_decoder.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="data.native"):
            assert jpeg_region.region_decoder() is None
        assert len(caplog.records) == 1 and "whole images are decoded" in caplog.records[0].getMessage()
        assert jpeg_region.decode_region(jpeg_bytes(photo(64, 48)), (0, 0, 8, 8)) is None
        assert not any((tmp_path / "cache").rglob("*.so*"))  # no half-built file left behind
        fast = FastResizedCrop(RandomResizedCropAndInterpolation(64, interpolation="bicubic"))
        decoded = fast.decode(EncodedImage(jpeg_bytes(photo(300, 200))), 1)
        assert decoded.origin == (0, 0) and fast.crop(decoded).size == (64, 64)
    finally:
        jpeg_region.region_decoder.cache_clear()


def test_a_helper_is_built_into_the_cache_under_the_hash_of_its_source(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = native.library_path(jpeg_region.SOURCE, ("jpeg",))
    assert target.parent == tmp_path / "swin-transformer" and not target.exists()
    assert native.build_library(jpeg_region.SOURCE, target, ("jpeg",)) is None and target.exists()
    assert target.stat().st_mode & 0o777 == 0o755  # loadable by others sharing the cache
    edited = tmp_path / "jpeg_region.c"
    edited.write_text(jpeg_region.SOURCE.read_text() + "\n/* edited */\n")
    assert native.library_path(edited, ("jpeg",)).name != target.name  # an edited source is built afresh
    assert native.library_path(jpeg_region.SOURCE, ()).name != target.name  # so are other libraries
    problem = native.build_library(edited, tmp_path / "x.so", ("no_such_library_here",))
    assert problem is not None and "no_such_library_here" in problem and not (tmp_path / "x.so").exists()


def test_an_unwritable_cache_falls_back_to_a_private_temporary_folder(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(native, "cache_dir", lambda: blocker / "cache")  # mkdir there raises
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert native.native_library(pillow_ops.SOURCE) is not None
    private = tmp_path / "tmp" / f"swin-transformer-{os.getuid()}"
    assert private.stat().st_mode & 0o777 == 0o700 and any(private.glob("pillow_ops-*.so"))
    # A temporary folder others may write to is refused (they could plant a library): one warning.
    shutil.rmtree(private)
    private.mkdir(mode=0o777)
    private.chmod(0o777)
    with caplog.at_level("WARNING", logger="data.native"):
        assert native.native_library(pillow_ops.SOURCE) is None
    assert len(caplog.records) == 1 and "not a private folder" in caplog.records[0].getMessage()


# -----------------------------------------------------------------------------
# RandAugment's rotate, shear, translate and sharpness
# -----------------------------------------------------------------------------
def test_shear_and_translate_equal_pillows_affine_transform_pixel_for_pixel():
    rng = random.Random(0)
    ops = {
        "shear_x": (fast_augment.shear_x, lambda m: (1, m, 0, 0, 1, 0)),
        "shear_y": (fast_augment.shear_y, lambda m: (1, 0, 0, m, 1, 0)),
        "translate_x": (fast_augment.translate_x_abs, lambda m: (1, 0, m, 0, 1, 0)),
        "translate_y": (fast_augment.translate_y_abs, lambda m: (1, 0, 0, 0, 1, m)),
    }
    checked = 0
    for i in range(40):
        img = photo(rng.choice([224, 160, 33, 7]), rng.choice([224, 192, 57, 5]), i)
        fill = tuple(rng.randrange(256) for _ in range(3))
        for name, (ours, affine) in ops.items():
            # Shears up to timm's 0.3 and beyond; shifts of a fraction of a pixel to past the image.
            magnitude = rng.uniform(-0.45, 0.45) if name.startswith("shear") else rng.uniform(-1.2, 1.2) * img.width
            for resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
                want = img.transform(
                    img.size, Image.Transform.AFFINE, affine(magnitude), resample=resample, fillcolor=fill
                )
                got = ours(img, magnitude, resample=resample, fillcolor=fill)
                assert got.mode == "RGB" and got.size == img.size
                assert got.tobytes() == want.tobytes(), (name, img.size, magnitude, resample)
                # The scalar form, which CPUs without AVX2 run, gives the same bytes.
                axis = 1 if name.endswith("_x") else 0
                scalar = fast_augment.shift_rows(img, affine(magnitude), axis, resample, fill, portable=True)
                assert scalar.tobytes() == want.tobytes(), (name, img.size, magnitude, resample)
                checked += 1
    assert checked == 320
    # A whole-pixel translation and one that leaves nothing of the image.
    img = photo(64, 48)
    for shift in (3.0, -70.0, 64.0):
        want = img.transform(
            img.size, Image.Transform.AFFINE, (1, 0, shift, 0, 1, 0), resample=Image.Resampling.BICUBIC
        )
        got = fast_augment.translate_x_abs(img, shift, resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))
        assert got.tobytes() == want.tobytes()


def test_other_modes_and_filters_take_pillows_own_transform():
    grey = photo(40, 30).convert("L")
    bicubic = Image.Resampling.BICUBIC
    want = grey.transform(grey.size, Image.Transform.AFFINE, (1, 0.2, 0, 0, 1, 0), resample=bicubic, fillcolor=128)
    got = fast_augment.shear_x(grey, 0.2, resample=Image.Resampling.BICUBIC, fillcolor=128)
    assert got.mode == "L" and got.tobytes() == want.tobytes()
    rgb = photo(40, 30)
    want = rgb.transform(rgb.size, Image.Transform.AFFINE, (1, 0, 4.5, 0, 1, 0), fillcolor=(1, 2, 3))
    got = fast_augment.translate_x_abs(rgb, 4.5, resample=Image.Resampling.NEAREST, fillcolor=(1, 2, 3))
    assert got.tobytes() == want.tobytes()


def test_rotate_equals_pillows_rotate_pixel_for_pixel():
    # timm's Rotate turns by up to 30 degrees either way (more with mstd); also past a turn, odd
    # and tiny sizes, and the quarter turns Pillow does by transposing.
    rng = random.Random(1)
    angles = [rng.uniform(-45, 45) for _ in range(60)] + [-400.5, 359.99, 0.0, 90.0, -180.0, 270.0, 1e-9]
    for i, degrees in enumerate(angles):
        width, height = rng.choice([(224, 224), (160, 97), (33, 57), (7, 5), (1, 1), (2, 9)])
        img = photo(width, height, i)
        fill = tuple(rng.randrange(256) for _ in range(3))
        for resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
            want = img.rotate(degrees, resample=resample, fillcolor=fill)
            got = fast_augment.rotate(img, degrees, resample=resample, fillcolor=fill)
            assert got.mode == "RGB" and got.tobytes() == want.tobytes(), (img.size, degrees, resample)
    if HAS_AVX2:  # the C form ran (elsewhere every call above was Pillow's own)
        assert pillow_ops.fast_rotate_available()


def test_sharpness_equals_pillows_image_enhance_pixel_for_pixel():
    from PIL import ImageEnhance, ImageFilter

    rng = random.Random(2)
    for i, (width, height) in enumerate([(224, 224), (161, 97), (3, 3), (2, 40), (40, 2), (1, 1), (5, 4)]):
        img = photo(width, height, i)
        assert fast_augment.smooth(img).tobytes() == img.filter(ImageFilter.SMOOTH).tobytes(), img.size
        for factor in (0.0, 0.1, 1.0, 1.9, rng.uniform(0.05, 1.95)):
            want = ImageEnhance.Sharpness(img).enhance(factor)
            assert fast_augment.sharpness(img, factor).tobytes() == want.tobytes(), (img.size, factor)
    grey = photo(30, 20).convert("L")  # other modes: Pillow's own
    want = ImageEnhance.Sharpness(grey).enhance(1.5)
    assert fast_augment.sharpness(grey, 1.5).tobytes() == want.tobytes()


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "original"])
def test_the_fast_augment_copy_gives_timms_images_and_draws(policy):
    # Same hparams as the recipe's train transform: fill with the mean, interpolation random.
    fast_t = build_transform(True, cfg("AUG.AUTO_AUGMENT", policy, "AUG.REPROB", "0.0"))
    augment = next(s for s in fast_t.reference.transforms if type(s).__name__ in ("RandAugment", "AutoAugment"))
    fast = next(s for s in fast_t.steps if type(s) is type(augment))
    assert fast is not augment
    names = [op.name for op in fast_augment._ops(fast)]
    assert names == [op.name for op in fast_augment._ops(augment)]
    swapped = {op.name for op in fast_augment._ops(fast) if op.aug_fn in fast_augment.REPLACEMENTS.values()}
    assert swapped and all(n.startswith(("Shear", "Translate", "Rotate", "Sharpness")) for n in swapped)
    assert {"Rotate", "ShearX"} <= swapped
    assert not any(op.aug_fn in fast_augment.REPLACEMENTS.values() for op in fast_augment._ops(augment))
    img = photo(224, 224, 3)
    for seed in range(60):
        with seeded_rngs(seed):
            a = fast(img)
            after_fast = generator_states()
        with seeded_rngs(seed):
            b = augment(img)
            after_ref = generator_states()
        assert a.tobytes() == b.tobytes() and after_fast == after_ref, seed
    flip = transforms.RandomHorizontalFlip()
    assert fast_augment.fast_augment_ops(flip) is flip  # anything else is left as it is


def test_the_fast_shear_and_translate_are_used_whatever_the_allocator_setting():
    for options in ((), ("RETAIN_FREED_MEMORY", "False")):
        fast = build_transform(True, cfg(*options))
        augment = [s for s in fast.steps if type(s).__name__ == "RandAugment"][0]
        assert augment is not fast.reference.transforms[2]
        assert any(op.aug_fn is fast_augment.shear_x for op in augment.ops)
        assert not any(op.aug_fn in fast_augment.REPLACEMENTS.values() for op in fast.reference.transforms[2].ops)


def test_without_the_c_kernel_the_ops_are_pillows_own(monkeypatch):
    from PIL import ImageEnhance

    monkeypatch.setattr(fast_augment, "ops_kernel", lambda: None)
    monkeypatch.setattr(fast_augment, "fast_rotate_available", lambda: False)
    img = photo(50, 40)
    want = img.transform(img.size, Image.Transform.AFFINE, (1, 0.2, 0, 0, 1, 0), resample=Image.Resampling.BICUBIC)
    got = fast_augment.shear_x(img, 0.2, resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))
    assert got.tobytes() == want.tobytes()
    want = img.rotate(12.5, resample=Image.Resampling.BICUBIC, fillcolor=(4, 5, 6))
    assert fast_augment.rotate(img, 12.5, resample=Image.Resampling.BICUBIC, fillcolor=(4, 5, 6)) == want
    assert fast_augment.sharpness(img, 1.7) == ImageEnhance.Sharpness(img).enhance(1.7)


# -----------------------------------------------------------------------------
# Pillow's resize, a window of it (the eval transform and reduced-scale crops)
# -----------------------------------------------------------------------------
def test_a_window_of_the_c_resize_equals_pillows_resize_then_crop():
    # Random sizes up and down, whole images and fractional boxes (Pillow's `box`), any window,
    # RGB and RGBX input, given whole or from the part the window reads, AVX2 and scalar passes.
    rng = random.Random(3)
    checked = 0
    for i in range(150):
        width, height = rng.randint(1, 320), rng.randint(1, 320)
        img = photo(width, height, i)
        if rng.random() < 0.5:
            box = None
        else:
            x0, y0 = rng.uniform(0, width - 0.5), rng.uniform(0, height - 0.5)
            box = (x0, y0, rng.uniform(x0 + 0.1, width), rng.uniform(y0 + 0.1, height))
        out_size = (rng.randint(1, 300), rng.randint(1, 300))
        if i % 10 == 0:
            out_size = (width, out_size[1])  # one axis unchanged: that pass is skipped, as Pillow skips it
        resample = rng.choice([Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
        if not pillow_ops.resize_applies(img.size, out_size, resample):
            continue
        left, top = rng.randrange(out_size[0]), rng.randrange(out_size[1])
        window = (left, top, rng.randint(1, out_size[0] - left), rng.randint(1, out_size[1] - top))
        want = np.asarray(img.resize(out_size, resample, box=box).crop((left, top, left + window[2], top + window[3])))
        rgb = np.asarray(img)
        rgbx = np.frombuffer(img.tobytes("raw", "RGBX"), np.uint8).reshape(height, width, 4)
        x0, y0, x1, y1 = pillow_ops.source_window(img.size, out_size, resample, window, box)
        for pixels in (rgb, rgbx):
            for part in (False, True):
                given = pixels[y0:y1, x0:x1] if part else pixels
                origin = (x0, y0) if part else (0, 0)
                for portable in (False, True):
                    got = pillow_ops.resize_window(given, img.size, out_size, resample, window, box, origin, portable)
                    assert np.array_equal(got, want), (img.size, out_size, box, window, resample, portable, part)
        checked += 1
    assert checked > 130


def test_pillows_vertical_first_resize_of_very_tall_images_is_left_to_pillow():
    # Pillow 12 resizes an image over 100 times taller than wide vertically first when it loses
    # height; the C resize goes horizontally first, so it declines those.
    assert not pillow_ops.resize_applies((2, 300), (40, 100), Image.Resampling.BICUBIC)
    assert pillow_ops.resize_applies((2, 300), (40, 400), Image.Resampling.BICUBIC) == pillow_ops.RESIZE_ORDER_KNOWN
    assert not pillow_ops.resize_applies((50, 40), (30, 20), Image.Resampling.LANCZOS)


def eval_samples(tmp_path: Path) -> list[tuple[str, Image.Image]]:
    """Files of every kind the eval transform meets: JPEGs of many shapes (wider, taller, square,
    under the resize size, exactly at it), greyscale, CMYK and progressive JPEGs, a PNG, and a
    tall strip that Pillow resizes vertically first."""
    shapes = [(500, 375), (375, 500), (256, 256), (300, 256), (97, 61), (257, 1000), (1024, 683), (224, 300), (3, 400)]
    files = []
    for i, (w, h) in enumerate(shapes):
        files.append(write(photo(w, h, i), tmp_path / f"{i}.jpg", "JPEG"))
    files.append(write(photo(333, 250, 1).convert("L"), tmp_path / "grey.jpg", "JPEG"))
    files.append(write(photo(320, 240, 2).convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG"))
    photo(300, 260, 3).save(tmp_path / "progressive.jpg", "JPEG", quality=85, progressive=True)
    files.append(tmp_path / "progressive.jpg")
    files.append(write(photo(281, 211, 4), tmp_path / "photo.png", "PNG"))
    return [(str(f), load_rgb(str(f))) for f in files]


EVAL_OPTIONS = [
    (),
    ("DATA.INTERPOLATION", "random"),
    ("TEST.CROP", "False"),
    ("DATA.IMG_SIZE", "384"),
    ("DATA.IMG_SIZE", "32"),
]


@pytest.mark.parametrize("opts", EVAL_OPTIONS)
def test_the_fast_eval_transform_gives_the_reference_tensors_bit_for_bit(tmp_path, opts):
    fast = build_transform(False, cfg(*opts), uint8_output=True)
    reference = build_transform(False, cfg("DATA.PIPELINE", "reference", *opts))
    assert isinstance(fast, fast_transforms.FastEvalTransform) and fast.fast
    fallbacks = []
    fast.reference = lambda img, steps=fast.reference: fallbacks.append(img.size) or steps(img)
    for path, decoded in eval_samples(tmp_path):
        want = reference(decoded)
        for given in (load_encoded(path), decoded, fast.decode_encoded(load_encoded(path))):
            got = fast(given)
            assert isinstance(got, Uint8Image) and torch.equal(got.normalized(), want), (path, opts, type(given))
    # Only the tall strip squeezed to a square (Pillow resizes that vertically first) left the C path.
    squeezed = opts in (("TEST.CROP", "False"), ("DATA.IMG_SIZE", "32"))
    assert set(fallbacks) <= {(3, 400)} and (len(fallbacks) == 3) == squeezed


def test_the_fast_eval_transform_computes_only_the_crop_in_c(monkeypatch, tmp_path):
    fast = build_transform(False, cfg(), uint8_output=True)
    calls = []
    monkeypatch.setattr(fast, "reference", lambda img: calls.append(img))
    path = write(photo(500, 375), tmp_path / "a.jpg", "JPEG")
    sample = fast(load_encoded(str(path)))
    assert sample.pixels.shape == (224, 224, 3) and not calls
    # 500x375 resized to 341x256, the centre 224x224 kept: only the columns and rows it reads.
    plan = fast.plan(500, 375)
    assert plan == ((341, 256), (58, 16, 224, 224))
    x0, y0, x1, y1 = pillow_ops.source_window((500, 375), *plan[:1], Image.Resampling.BICUBIC, plan[1])
    assert 0 < x0 and x1 < 500 and 0 < y0 and y1 < 375


def test_a_reduced_scale_crop_through_the_c_resize_equals_pillows_resize_of_the_box():
    crop = FastResizedCrop(RandomResizedCropAndInterpolation(224, interpolation="random"))
    rng = random.Random(5)
    for i in range(20):
        img = photo(rng.randint(300, 700), rng.randint(300, 700), i)
        scale = rng.choice([2, 4])
        w, h = rng.randint(224, img.width), rng.randint(224, img.height)
        box = (rng.randint(0, img.height - h), rng.randint(0, img.width - w), h, w)
        for interpolation in (F.InterpolationMode.BILINEAR, F.InterpolationMode.BICUBIC):
            for image in (img, torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)):
                for mirror in (False, True):
                    decoded = fast_transforms.DecodedCrop(image, box, scale, interpolation, None)
                    got = crop.crop(decoded, mirror)
                    top, left = box[0], box[1]
                    region = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
                    want = img.resize((224, 224), F.pil_modes_mapping[interpolation], box=region)
                    want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else want
                    assert got.tobytes() == want.tobytes(), (img.size, box, scale, interpolation, mirror)


def test_resize_window_refuses_what_it_would_read_out_of_bounds_with():
    pixels = np.zeros((30, 40, 3), np.uint8)
    bicubic = Image.Resampling.BICUBIC
    with pytest.raises(ValueError, match="box"):
        pillow_ops.resize_window(pixels, (40, 30), (20, 20), bicubic, (0, 0, 20, 20), box=(10, 10, 60, 50))
    with pytest.raises(ValueError, match="box"):
        pillow_ops.resize_window(pixels, (40, 30), (20, 20), bicubic, (0, 0, 20, 20), box=(20, 10, 10, 20))
    with pytest.raises(ValueError, match="window"):
        pillow_ops.resize_window(pixels, (40, 30), (20, 20), bicubic, (15, 15, 10, 10))
    with pytest.raises(ValueError, match="uint8"):
        pillow_ops.resize_window(pixels.astype(np.int32), (40, 30), (20, 20), bicubic, (0, 0, 20, 20))


def test_the_c_resize_returns_none_when_memory_runs_out(tmp_path):
    # Address space capped: the taps' bounds fit, their weights do not; C frees what it got, once.
    script = tmp_path / "oom.py"
    script.write_text(
        "import resource, numpy as np\n"
        "from PIL import Image\n"
        "from data import pillow_ops\n"
        "assert pillow_ops.ops_kernel() is not None\n"
        "size = [l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]\n"
        "limit = int(size) * 1024 + (1 << 30)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "out = pillow_ops.resize_window(np.zeros((10, 10, 3), np.uint8), (10, 10), (100_000_000, 10),\n"
        "                               Image.Resampling.BILINEAR, (0, 0, 4, 4))\n"
        "print(out is None)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


def test_the_training_transform_builds_the_c_helpers_before_workers_start(monkeypatch):
    # Without RandAugment too: the reduced-scale crops resize through pillow_ops.c.
    pillow_ops.ops_kernel.cache_clear()
    build_transform(True, cfg("AUG.AUTO_AUGMENT", "none"))
    assert pillow_ops.ops_kernel.cache_info().currsize == 1
