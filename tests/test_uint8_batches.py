"""The fast pipeline's uint8 samples, normalised and erased per batch (``data/uint8_batches.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing

from config import get_config
from data import build_dataset, build_loader, build_transform
from data.sample_seeds import seeded_rngs
from data.uint8_batches import ErasingRecorder, Uint8Batch, Uint8Image, collate_samples
from engine import model_inputs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cfg(*opts):
    base = ["DATA.NUM_WORKERS", "0", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "DATA.BATCH_SIZE", "4"]
    return get_config(opts=base + [str(o) for o in opts])


def random_image(seed: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_folders(root: Path, n: int = 8) -> Path:
    for split in ("train", "val"):
        for i in range(n):
            path = root / split / "ab"[i % 2] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            random_image(i).save(path)
    return root


@pytest.mark.parametrize("mode,count", [("pixel", 1), ("pixel", 3), ("rand", 2), ("const", 1)])
def test_a_batch_normalised_on_its_device_equals_the_stacked_reference_samples_bit_for_bit(mode, count):
    # IMG_SIZE 32: pad-and-crop, no resize, so the fast samples are the reference's pixels exactly.
    opts = ("DATA.IMG_SIZE", "32", "AUG.REPROB", "0.7", "AUG.REMODE", mode, "AUG.RECOUNT", str(count))
    fast = build_transform(True, cfg(*opts), uint8_output=True)
    ref = build_transform(True, cfg(*opts, "DATA.PIPELINE", "reference"))
    samples, expected = [], []
    for seed in range(12):
        img = random_image(seed)
        with seeded_rngs(seed):
            samples.append(fast(img))
        with seeded_rngs(seed):
            expected.append(ref(img))
    assert all(isinstance(s, Uint8Image) and s.pixels.dtype == torch.uint8 for s in samples)
    erased = sum(len(s.erasures) for s in samples)
    assert erased >= 4  # p = 0.7 over 12 samples
    batch = Uint8Batch.collate(samples)
    assert batch.boxes.shape == (erased, 8)
    got = batch.to("cpu")
    assert got.dtype == torch.float32 and got.shape == (12, 3, 32, 32) and got.is_contiguous()
    assert torch.equal(got, torch.stack(expected))
    assert all(torch.equal(s.normalized(), e) for s, e in zip(samples, expected, strict=True))


def test_the_recorder_captures_timms_rectangles_and_fills_with_the_same_draws():
    erasing = RandomErasing(probability=1.0, mode="pixel", max_count=2, device="cpu")
    with seeded_rngs(5):
        real = torch.zeros(3, 24, 30)
        erasing(real)
    with seeded_rngs(5):
        recorder = ErasingRecorder((3, 24, 30))
        erasing(recorder)
    assert recorder.erasures
    replayed = torch.zeros(3, 24, 30)
    for top, left, h, w, fill in recorder.erasures:
        assert fill.shape == (3, h, w) and 0 <= top and top + h <= 24 and left + w <= 30
        replayed[:, top : top + h, left : left + w] = fill
    assert torch.equal(replayed, real) and real.abs().sum() > 0


def test_the_recorder_refuses_a_write_it_cannot_replay():
    recorder = ErasingRecorder((3, 8, 8))
    with pytest.raises(TypeError):
        recorder[0, 1:2, 1:2] = 1.0


def test_a_sample_travels_as_a_quarter_of_the_float_bytes():
    img = random_image(0, (224, 224))
    sample = Uint8Image.from_image(img, erasures=[], mean=MEAN, std=STD)
    assert sample.pixels.shape == (224, 224, 3) and sample.pixels.dtype == torch.uint8
    assert sample.pixels.nbytes * 4 == sample.normalized().nbytes
    assert np.array_equal(sample.pixels.numpy(), np.asarray(img))
    grey = Uint8Image.from_image(img.convert("L"), erasures=[], mean=MEAN, std=STD)
    assert grey.pixels.shape == (224, 224, 3)  # converted to RGB, as every reader does


def test_one_batch_holds_one_normalisation():
    a = Uint8Image.from_image(random_image(0), erasures=[], mean=MEAN, std=STD)
    b = Uint8Image.from_image(random_image(1), erasures=[], mean=(0.5, 0.5, 0.5), std=STD)
    with pytest.raises(ValueError):
        Uint8Batch.collate([a, b])


def test_the_loaders_yield_uint8_batches_under_fast_and_float_ones_under_reference(tmp_path):
    root = make_folders(tmp_path)
    opts = ("DATA.DATA_PATH", root, "DATA.IMG_SIZE", "32", "AUG.REPROB", "1.0", "SEED", "2")
    for workers in ("0", "2"):
        fast = build_loader(cfg(*opts, "DATA.NUM_WORKERS", workers), 1, 0)
        ref = build_loader(cfg(*opts, "DATA.NUM_WORKERS", workers, "DATA.PIPELINE", "reference"), 1, 0)
        fast_batches, ref_batches = list(fast.loader_train), list(ref.loader_train)
        assert len(fast_batches) == len(ref_batches) == 2
        for (xa, ya), (xb, yb) in zip(fast_batches, ref_batches, strict=True):
            assert isinstance(xa, Uint8Batch) and xa.pixels.dtype == torch.uint8 and len(xa) == 4
            assert isinstance(xb, torch.Tensor) and xb.dtype == torch.float32
            (inputs,) = model_inputs(xa, torch.device("cpu"))
            assert torch.equal(inputs, xb) and torch.equal(ya, yb)
        # Validation batches too: uint8 from the loader, the reference's float batch on the device.
        fast_val, ref_val = list(fast.loader_val), list(ref.loader_val)
        assert len(fast_val) == len(ref_val) == 2
        for (xa, ya), (xb, yb) in zip(fast_val, ref_val, strict=True):
            assert isinstance(xa, Uint8Batch) and isinstance(xb, torch.Tensor)
            assert torch.equal(xa.to("cpu"), xb) and torch.equal(ya, yb)


def test_collate_passes_other_samples_to_default_collate():
    batch = collate_samples([(torch.ones(2), 1), (torch.zeros(2), 0)])
    assert torch.equal(batch[0], torch.tensor([[1.0, 1.0], [0.0, 0.0]])) and batch[1].tolist() == [1, 0]


def test_dataset_samples_collate_into_one_batch_of_the_configured_size(tmp_path):
    # The fast samples of one dataset all have IMG_SIZE x IMG_SIZE pixels, so batches stack.
    root = make_folders(tmp_path)
    dataset, _ = build_dataset(True, cfg("DATA.DATA_PATH", root, "DATA.IMG_SIZE", "48"))
    samples = [dataset[(i, i)] for i in range(4)]
    assert {s[0].pixels.shape for s in samples} == {(48, 48, 3)}
    images, targets = collate_samples(samples)
    assert images.to("cpu").shape == (4, 3, 48, 48) and targets.tolist() == [s[1] for s in samples]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned memory and a device copy")
def test_a_pinned_batch_is_normalised_on_the_gpu_as_on_the_cpu():
    samples = []
    erasing = RandomErasing(probability=1.0, mode="pixel", device="cpu")
    for seed in range(6):
        recorder = ErasingRecorder((3, 36, 40))
        with seeded_rngs(seed):
            erasing(recorder)
        samples.append(Uint8Image.from_image(random_image(seed), erasures=recorder.erasures, mean=MEAN, std=STD))
    batch = Uint8Batch.collate(samples).pin_memory()
    assert all(t.is_pinned() for t in (batch.pixels, batch.fills, batch.mean, batch.std))
    on_gpu = batch.to("cuda", non_blocking=True)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), batch.to("cpu"))  # exact divisions on both devices


def test_simmim_batches_carry_uint8_images_beside_their_masks(tmp_path):
    root = make_folders(tmp_path)
    demo = Path(__file__).parents[1] / "configs" / "demo" / "simmim_demo_digits.yaml"
    opts = ["DATA.DATA_PATH", str(root), "DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "4", "MODEL.SWIN.EMBED_DIM", "16"]
    bundle = build_loader(get_config(str(demo), opts), 1, 0)
    (images, masks), _ = next(iter(bundle.loader_train))
    assert isinstance(images, Uint8Batch) and images.pixels.dtype == torch.uint8
    inputs = model_inputs([images, masks], torch.device("cpu"))
    size = bundle.dataset_train[(0, 0)][0][0].pixels.shape[0]
    assert inputs[0].shape == (4, 3, size, size) and inputs[0].dtype == torch.float32
    assert torch.equal(inputs[1], masks)
    # The same samples one by one, normalised alone, give the batch.
    order = list(bundle.sampler_train)[:4]
    alone = torch.stack([bundle.dataset_train[key][0][0].normalized() for key in order])
    assert torch.equal(inputs[0], alone)
