"""Images/s per core of the input pipelines, against the released transform stack, in the same run.

    python scripts/benchmark_data.py [--out DIR] [--images 400] [--sizes 500x375,1000x750]
        [--rounds 3] [--batch-size 32] [--batches 0] [--workers 0,1,2] [--json FILE] [--glibc-defaults]

For each size WxH it writes an ImageFolder (``train/`` with ``--images`` JPEGs, ``val/`` with a
quarter as many, 4 classes, quality 90) of random crops + resizes of scikit-learn's two sample
photographs (china.jpg and flower.jpg, 640x427), then the same images as the zip layout
(``data/zip_dataset.py``'s writer) and as tar shards (``data/shards.py``'s writer), and measures:

* transform, one thread (``torch.set_num_threads(1)``, no loader): the whole training transform
  of the recipe (``DATA.PIPELINE reference``: timm's ``create_transform`` as released, vs
  ``fast``), file read + decode included, and the validation transform (timm's eval resize and
  centre crop; under fast only the crop of the resize is computed, in C with Pillow's arithmetic,
  and the sample stays uint8, normalised in the batch step). CPU time of this
  thread, so "per core". The two pipelines are timed in turn over chunks of 25 images (the order
  alternating from chunk to chunk), each image under the same per-sample seed for both, so they
  make the same random draws and a slower minute of a shared machine falls on both alike; the
  table shows the median over ``--rounds``, and the paired ratio is the median of the rounds' ratios.
* where the time goes: the same images through each pipeline's parts one by one (read + decode,
  crop + resize, flip, RandAugment, to-tensor + normalise, random erasing; fast: to uint8 +
  erasing draws), CPU ms per image.
* the batch step, per image: collating batches of ``--batch-size`` samples and making them the
  model's input on the CPU; for fast that includes the normalisation and erasing a training
  run does on the model's device (``data/uint8_batches.py``), so the ratio is also given with it
  counted, as on a machine where the model runs on this CPU.
* loader: wall-clock images/s of ``data.build_loader``'s training loader (batch ``--batch-size``,
  one epoch or ``--batches`` batches, worker start-up included) for DATA.FORMAT folder, zip
  (``DATA.CACHE_MODE no``: every image read from the zip) and shards, DATA.NUM_WORKERS 0, 1, 2,
  both pipelines, interleaved over rounds; "per core" divides by the processes that transform
  (max(1, workers)).

Both pipelines run under the allocator setting the loader gives its processes
(``RETAIN_FREED_MEMORY``, on by default: glibc keeps freed memory); ``--glibc-defaults``
measures both with glibc's defaults instead.

The goal of issue #15 is 2x the released stack's images/s per core at the same recipe; the script
says whether the train and val transform measurements meet it. It also prints the CPU model, its ISA flags and
the load average (the machine may be shared: compare rows of one run, not across runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

# Run as `python scripts/benchmark_data.py`: make the repository's modules importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from allocator import retain_freed_memory  # noqa: E402
from config import default_config  # noqa: E402
from data.build import build_loader, build_transform  # noqa: E402
from data.fast_transforms import DecodedCrop, FastTrainTransform  # noqa: E402
from data.robust import load_encoded, load_rgb  # noqa: E402
from data.sample_seeds import sample_seed, seeded_rngs  # noqa: E402
from data.shards import write_split_shards  # noqa: E402
from data.uint8_batches import collate_samples  # noqa: E402
from data.zip_dataset import map_path, write_zip_split, zip_path  # noqa: E402

CLASSES = ("class0", "class1", "class2", "class3")
FORMATS = ("folder", "zip", "shards")
PIPELINES = ("reference", "fast")
GOAL = 2.0
DECODE = "read + decode"
STAGE_NAMES = {
    "RandomResizedCropAndInterpolation": "crop + resize",
    "FastResizedCrop": "crop + resize",
    "RandomHorizontalFlip": "flip",
    "RandAugment": "RandAugment",
    "AutoAugment": "AutoAugment",
    "AugMixAugment": "AugMix",
    "ColorJitter": "colour jitter",
    "ToTensor": "to-tensor + normalise",
    "MaybeToTensor": "to-tensor + normalise",
    "Normalize": "to-tensor + normalise",
    "ToNormalizedTensor": "to-tensor + normalise",
    "RandomErasing": "random erasing",
    "Uint8Tail": "to uint8 + erasing draws",
}
BATCH_STEP = "batch step"
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx")


# -----------------------------------------------------------------------------
# Machine
# -----------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, the ISA flags that matter for Pillow / libjpeg / torch, cores and load average."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = {name: name in flags for name in ISA_FLAGS if name != "amx"}
    isa["amx"] = any(f.startswith("amx") for f in flags)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"cpu": model, "isa": isa, "cores": cores, "load_average": list(os.getloadavg())}


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) < 1 or int(h) < 1:
            raise SystemExit(f"--sizes: {part!r} is not WIDTHxHEIGHT, e.g. 500x375")
        sizes.append((int(w), int(h)))
    return sizes


def sample_photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def random_view(photo: Image.Image, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A random crop of ``photo`` with the aspect ratio of ``size`` (50-100 % of the largest), resized to it."""
    w, h = size
    pw, ph = photo.size
    cw, ch = (pw, pw * h / w) if pw * h / w <= ph else (ph * w / h, ph)
    s = rng.uniform(0.5, 1.0) ** 0.5
    cw, ch = cw * s, ch * s
    left, top = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    img = photo.resize((w, h), Image.Resampling.LANCZOS, box=(left, top, left + cw, top + ch))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def make_image_folder(root: str, size: tuple[int, int], n_train: int, n_val: int, seed: int = 0) -> dict[str, Any]:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (quality 90); skipped when present."""
    rng = random.Random(seed)
    photos = sample_photos()
    nbytes = []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = os.path.join(root, split, CLASSES[i % len(CLASSES)])
            path = os.path.join(folder, f"{split}_{i:06d}.jpg")
            if not os.path.isfile(path):
                os.makedirs(folder, exist_ok=True)
                random_view(photos[i % len(photos)], size, rng).save(path, quality=90)
            nbytes.append(os.path.getsize(path))
    return {"train": n_train, "val": n_val, "mean_kib": sum(nbytes) / len(nbytes) / 1024}


SCRATCH_SETTINGS = "settings.json"


def fresh_scratch(root: str, settings: dict[str, Any]) -> None:
    """Keep ``root``'s images and layouts only when a run with the same ``settings`` wrote them:
    a reused ``--out`` with another ``--images`` would otherwise time the old files (shards kept
    at the old count, extra images left over). Removes only what this script writes there."""
    record = os.path.join(root, SCRATCH_SETTINGS)
    if os.path.isfile(record):
        with open(record) as f:
            if json.load(f) == settings:
                return
    for sub in ("folder", "zip", "shards"):
        shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    with open(record, "w") as f:
        json.dump(settings, f)


def write_layouts(root: str) -> dict[str, str]:
    """The zip layout and the shards of ``root``'s ImageFolder; ``format -> DATA_PATH``."""
    folder = os.path.join(root, "folder")
    zip_root = os.path.join(root, "zip")
    shard_root = os.path.join(root, "shards")
    os.makedirs(zip_root, exist_ok=True)
    class_to_idx = {c: i for i, c in enumerate(CLASSES)}
    for split in ("train", "val"):
        write_zip_split(os.path.join(folder, split), zip_path(zip_root, split), map_path(zip_root, split), class_to_idx)
        if not os.path.isfile(os.path.join(shard_root, split, "shards.json")):
            n = sum(len(os.listdir(os.path.join(folder, split, c))) for c in CLASSES)
            write_split_shards(
                os.path.join(folder, split),
                os.path.join(shard_root, split),
                CLASSES,
                shuffle_seed=0 if split == "train" else None,
                shard_size=max(1, -(-n // 4)),  # 4 shards per split
            )
    return {"folder": folder, "zip": zip_root, "shards": shard_root}


def image_paths(split_dir: str) -> list[str]:
    return sorted(os.path.join(split_dir, c, name) for c in CLASSES for name in os.listdir(os.path.join(split_dir, c)))


# -----------------------------------------------------------------------------
# Transforms, one thread
# -----------------------------------------------------------------------------
def make_config(
    data_path: str = "",
    fmt: str = "folder",
    pipeline: str = "fast",
    workers: int = 0,
    batch: int = 32,
    retain: bool = True,
):
    """The recipe's defaults (224, RandAugment rand-m9-mstd0.5-inc1, erasing 0.25) with these data
    keys; ``retain``: RETAIN_FREED_MEMORY (``--glibc-defaults`` turns it off)."""
    config = default_config()
    config.defrost()
    config.RETAIN_FREED_MEMORY = retain
    config.DATA.DATA_PATH = data_path
    config.DATA.FORMAT = fmt
    config.DATA.ZIP_MODE = fmt == "zip"
    config.DATA.CACHE_MODE = "no"
    config.DATA.PIPELINE = pipeline
    config.DATA.NUM_WORKERS = workers
    config.DATA.BATCH_SIZE = batch
    config.freeze()
    return config


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def paired_ms_per_image(
    fns: dict[str, Callable[[str], Any]], paths: Sequence[str], seed: int, chunk: int = 25
) -> dict[str, float]:
    """Thread CPU time of each of ``fns`` over ``paths``, ms per image, timed in turn chunk by chunk.

    Each function runs over ``chunk`` images, then the next over the same images, the order
    alternating from chunk to chunk: a slower minute of a shared machine falls on all alike, while
    each function keeps its caches warm for a chunk, as a loader worker running one pipeline does
    (alternating image by image cost the faster pipeline more: 1.78x against 1.88-2.03x here).
    Every image runs under the same per-sample seed for every function, so they make the same
    random draws; seeding is not timed.
    """
    totals = dict.fromkeys(fns, 0)
    names = list(fns)
    gc.collect()
    for c, first in enumerate(range(0, len(paths), chunk)):
        for name in names if c % 2 == 0 else reversed(names):
            fn = fns[name]
            for i in range(first, min(first + chunk, len(paths))):
                with seeded_rngs(sample_seed(seed, 0, i)):
                    start = time.thread_time_ns()
                    fn(paths[i])
                    totals[name] += time.thread_time_ns() - start
    return {name: t / 1e6 / len(paths) for name, t in totals.items()}


def stage_name(step: Any) -> str:
    return STAGE_NAMES.get(type(step).__name__, type(step).__name__)


def staged_ms(pipeline: str, transform: Any, paths: Sequence[str], seed: int) -> tuple[dict[str, float], float]:
    """CPU ms per image of each part of ``transform`` (run part by part, as the whole runs them), and
    the share of reduced-size decodes (fast)."""
    totals: dict[str, int] = {DECODE: 0}
    reduced = 0
    clock = time.thread_time_ns
    seed_all(seed)
    gc.collect()
    for p in paths:
        t = clock()
        if pipeline == "fast":
            img: Any = transform.decode_encoded(load_encoded(p))
            steps = list(transform.steps)
        else:
            img = load_rgb(p)
            steps = list(transform.transforms)
        now = clock()
        totals[DECODE] += now - t
        if isinstance(img, DecodedCrop):
            reduced += img.scale > 1
            t = now
            random.setstate(img.random_state)
            img = transform.crop.crop(img, transform.draw_mirror())  # fast: the flip goes with the crop
            now = clock()
            totals["crop + resize"] = totals.get("crop + resize", 0) + now - t
        elif pipeline == "fast" and transform.crop is not None:
            steps.insert(0, transform.crop)
        for step in steps:
            t = now
            img = step(img)
            now = clock()
            name = stage_name(step)
            totals[name] = totals.get(name, 0) + now - t
    return {k: v / 1e6 / len(paths) for k, v in totals.items()}, reduced / len(paths)


def batch_step_ms(samples: Sequence[Any], batch: int) -> float:
    """Thread CPU time per image of collating ``samples`` in batches of ``batch`` and making each
    the model's input on the CPU (``model_inputs``: the fast pipeline's normalise + erase)."""
    gc.collect()
    start = time.thread_time_ns()
    for i in range(0, len(samples), batch):
        images, _ = collate_samples(samples[i : i + batch])
        images.to("cpu")
    return (time.thread_time_ns() - start) / 1e6 / len(samples)


def bench_transforms(
    train_paths: Sequence[str], val_paths: Sequence[str], rounds: int, retain: bool = True, batch: int = 32
) -> dict[str, Any]:
    """Whole train transforms (reference, fast), the val transform, the batch steps and the per-stage
    runs, interleaved."""
    reference = build_transform(True, make_config(pipeline="reference", retain=retain))
    # As the loader's datasets build them: under fast, samples stay uint8 until the batch step.
    fast = build_transform(True, make_config(pipeline="fast", retain=retain), uint8_output=True)
    val_reference = build_transform(False, make_config(pipeline="reference", retain=retain))
    val_fast = build_transform(False, make_config(pipeline="fast", retain=retain), uint8_output=True)
    if not isinstance(fast, FastTrainTransform):
        raise RuntimeError(f"DATA.PIPELINE fast built {type(fast).__name__}, not FastTrainTransform")
    train_fns = {
        "reference": lambda p: reference(load_rgb(p)),
        "fast": lambda p: fast(fast.decode_encoded(load_encoded(p))),
    }
    val_fns = {
        "val reference": lambda p: val_reference(load_rgb(p)),
        "val fast": lambda p: val_fast(val_fast.decode_encoded(load_encoded(p))),
    }
    jobs: dict[str, Callable[[int], Any]] = {
        "train": lambda r: paired_ms_per_image(train_fns, train_paths, r),
        "val": lambda r: paired_ms_per_image(val_fns, val_paths, r),
        "stages reference": lambda r: staged_ms("reference", reference, train_paths, r),
        "stages fast": lambda r: staged_ms("fast", fast, train_paths, r),
    }
    # The batch step's inputs: one sample per training image (the label is irrelevant).
    outputs = {
        "reference": [(reference(load_rgb(p)), 0) for p in train_paths],
        "fast": [(fast(fast.decode_encoded(load_encoded(p))), 0) for p in train_paths],
    }
    outputs["val reference"] = [(val_reference(load_rgb(p)), 0) for p in val_paths]
    outputs["val fast"] = [(val_fast(val_fast.decode_encoded(load_encoded(p))), 0) for p in val_paths]
    for name in list(outputs):
        jobs[f"batch {name}"] = lambda r, name=name: batch_step_ms(outputs[name], batch)
    # Warm the page cache and the allocator, untimed.
    for p in list(train_paths[:8]):
        reference(load_rgb(p))
        fast(fast.decode_encoded(load_encoded(p)))
    for p in list(val_paths[:8]):
        val_reference(load_rgb(p))
        val_fast(val_fast.decode_encoded(load_encoded(p)))
    raw: dict[str, list[Any]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name in list(jobs) if r % 2 == 0 else list(reversed(jobs)):
            raw[name].append(jobs[name](r))

    result: dict[str, Any] = {}
    for job, names in (("train", ("reference", "fast")), ("val", ("val reference", "val fast"))):
        for name in names:
            runs = [run[name] for run in raw[job]]
            ms = statistics.median(runs)
            result[name] = {"ms_per_image": ms, "images_per_s_per_core": 1000.0 / ms, "rounds_ms": runs}
    result["val_ratio"] = result["val reference"]["ms_per_image"] / result["val fast"]["ms_per_image"]
    result["ratio"] = result["fast"]["images_per_s_per_core"] / result["reference"]["images_per_s_per_core"]
    result["paired_ratio"] = statistics.median(run["reference"] / run["fast"] for run in raw["train"])
    # Where the model runs on this CPU, the batch step (fast: normalise + erase) costs CPU too.
    steps = {p: statistics.median(raw[f"batch {p}"]) for p in PIPELINES}
    result[BATCH_STEP] = {p: {"ms_per_image": steps[p], "rounds_ms": raw[f"batch {p}"]} for p in PIPELINES}
    with_step = {p: result[p]["ms_per_image"] + steps[p] for p in PIPELINES}
    result["ratio_with_batch_step_on_cpu"] = with_step["reference"] / with_step["fast"]
    val_steps = {p: statistics.median(raw[f"batch val {p}"]) for p in PIPELINES}
    result["val_batch_step"] = {p: {"ms_per_image": val_steps[p]} for p in PIPELINES}
    val_with = {p: result[f"val {p}"]["ms_per_image"] + val_steps[p] for p in PIPELINES}
    result["val_ratio_with_batch_step_on_cpu"] = val_with["reference"] / val_with["fast"]
    stages: dict[str, Any] = {}
    for pipeline in PIPELINES:
        runs = [s for s, _ in raw[f"stages {pipeline}"]]
        names = list(dict.fromkeys(k for s in runs for k in s))
        stages[pipeline] = {k: statistics.median(s.get(k, 0.0) for s in runs) for k in names}
    result["stages"] = stages
    result["fast_reduced_decode_share"] = statistics.median(share for _, share in raw["stages fast"])
    return result


# -----------------------------------------------------------------------------
# Loaders
# -----------------------------------------------------------------------------
def loader_images_per_s(config: Any, batches: int) -> tuple[float, int]:
    """Wall-clock images/s of one epoch (or ``batches`` batches) of the training loader, from
    ``iter()`` (worker start-up included) to the last batch; and the images counted."""
    bundle = build_loader(config, 1, 0)
    loader = bundle.loader_train
    gc.collect()
    images = 0
    start = time.perf_counter()
    it = iter(loader)
    for i, (inputs, _) in enumerate(it):
        inputs = inputs.to("cpu")  # the model's input (the fast pipeline normalises and erases here)
        images += int(inputs.shape[0])
        if batches and i + 1 >= batches:
            break
    elapsed = time.perf_counter() - start
    del it, loader, bundle
    return images / elapsed, images


def bench_loaders(
    paths: dict[str, str], workers: Sequence[int], batch: int, batches: int, rounds: int, retain: bool = True
) -> list[dict[str, Any]]:
    keys = [(fmt, w, pipeline) for fmt in FORMATS for w in workers for pipeline in PIPELINES]
    raw: dict[tuple[str, int, str], list[float]] = {k: [] for k in keys}
    counted: dict[tuple[str, int, str], int] = {}
    for r in range(rounds):
        for key in keys if r % 2 == 0 else list(reversed(keys)):
            fmt, w, pipeline = key
            rate, counted[key] = loader_images_per_s(make_config(paths[fmt], fmt, pipeline, w, batch, retain), batches)
            raw[key].append(rate)
    rows = []
    for fmt, w, pipeline in keys:
        rate = statistics.median(raw[(fmt, w, pipeline)])
        rows.append(
            {
                "format": fmt,
                "workers": w,
                "pipeline": pipeline,
                "images": counted[(fmt, w, pipeline)],
                "images_per_s": rate,
                "images_per_s_per_core": rate / max(1, w),
                "rounds": raw[(fmt, w, pipeline)],
            }
        )
    return rows


# -----------------------------------------------------------------------------
# Report
# -----------------------------------------------------------------------------
def size_table(name: str, info: dict[str, Any], tr: dict[str, Any], loaders: list[dict[str, Any]], rounds: int) -> str:
    out = [
        f"== {name}: {info['train']} train / {info['val']} val JPEGs (quality 90, {info['mean_kib']:.0f} KiB mean), "
        f"output 224, median of {rounds} round(s) ==",
        "",
        "transform, one thread: CPU ms per image (images/s per core)",
        f"{'stage':<24} {'reference':>16} {'fast':>16} {'fast/ref':>9}",
    ]
    ref, fast = tr["stages"]["reference"], tr["stages"]["fast"]
    for stage in dict.fromkeys([*ref, *fast]):
        a, b = ref.get(stage), fast.get(stage)
        ratio = f"{a / b:8.2f}x" if a and b else ""
        out.append(
            f"{stage:<24} {'-' if a is None else f'{a:.2f}':>16} {'-' if b is None else f'{b:.2f}':>16} {ratio:>9}"
        )
    share = tr["fast_reduced_decode_share"]
    out.append(f"{'(sum of stages)':<24} {sum(ref.values()):>16.2f} {sum(fast.values()):>16.2f}")
    r, f = tr["reference"], tr["fast"]
    whole_r = f"{r['ms_per_image']:.2f} ({r['images_per_s_per_core']:.0f}/s)"
    whole_f = f"{f['ms_per_image']:.2f} ({f['images_per_s_per_core']:.0f}/s)"
    out.append(f"{'whole train transform':<24} {whole_r:>16} {whole_f:>16} {tr['ratio']:8.2f}x")
    b_r, b_f = (tr[BATCH_STEP][p]["ms_per_image"] for p in PIPELINES)
    out.append(f"{'batch step (per image)':<24} {b_r:>16.2f} {b_f:>16.2f}")
    out.append(
        f"  the batch step: collate in the worker (reference: float32 samples) and, for fast, normalise + erase "
        f"on the model's device; with it on this CPU too: {tr['ratio_with_batch_step_on_cpu']:.2f}x"
    )
    v_r, v_f = tr["val reference"], tr["val fast"]
    val_r = f"{v_r['ms_per_image']:.2f} ({v_r['images_per_s_per_core']:.0f}/s)"
    val_f = f"{v_f['ms_per_image']:.2f} ({v_f['images_per_s_per_core']:.0f}/s)"
    out.append(f"{'val transform':<24} {val_r:>16} {val_f:>16} {tr['val_ratio']:8.2f}x")
    out.append(
        f"  with its batch step (fast: normalise on the model's device) on this CPU too: "
        f"{tr['val_ratio_with_batch_step_on_cpu']:.2f}x"
    )
    out.append(f"fast decoded {share:.0%} of the images at reduced size; paired ratio {tr['paired_ratio']:.2f}x")
    out += [
        "",
        "loader (build_loader, train split): wall images/s (per core)",
        f"{'format':<8} {'workers':>7} {'reference':>18} {'fast':>18} {'fast/ref':>9}",
    ]
    by_key = {(row["format"], row["workers"], row["pipeline"]): row for row in loaders}
    for fmt, w in dict.fromkeys((row["format"], row["workers"]) for row in loaders):
        a, b = by_key[(fmt, w, "reference")], by_key[(fmt, w, "fast")]
        cells = [f"{x['images_per_s']:.0f} ({x['images_per_s_per_core']:.0f})" for x in (a, b)]
        out.append(f"{fmt:<8} {w:>7} {cells[0]:>18} {cells[1]:>18} {b['images_per_s'] / a['images_per_s']:8.2f}x")
    return "\n".join(out)


def goal_line(ratios: dict[str, float]) -> tuple[bool, str]:
    met = all(r >= GOAL for r in ratios.values())
    detail = ", ".join(f"{r:.2f}x at {name}" for name, r in ratios.items())
    verdict = "MET" if met else "NOT MET"
    goal = f">= {GOAL:.0f}x the released stack's images/s per core (train and val transforms)"
    return met, f"goal: {goal}: {verdict} ({detail})"


def machine_line(m: dict[str, Any]) -> str:
    isa = " ".join(f"{k}{'+' if v else '-'}" for k, v in m["isa"].items())
    load = " ".join(f"{x:.2f}" for x in m["load_average"])
    return f"cpu: {m['cpu']}, {m['cores']} cores; {isa}; load average {load}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None, help="scratch folder for the images (default: a temporary folder)")
    p.add_argument(
        "--images", type=int, default=400, help="training images per size (val: a quarter, one per class at least)"
    )
    p.add_argument("--sizes", default="500x375,1000x750", help="comma-separated WIDTHxHEIGHT")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=0, help="loader batches per measurement (0: one epoch)")
    p.add_argument("--workers", default="0,1,2", help="DATA.NUM_WORKERS values of the loader rows")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's allocator as it starts (RETAIN_FREED_MEMORY False) for both pipelines",
    )
    args = p.parse_args(argv)
    if args.images < 4 or args.rounds < 1 or args.batch_size < 1 or args.batches < 0:
        p.error("need --images >= 4, --rounds >= 1, --batch-size >= 1, --batches >= 0")
    return args


def run(args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    sizes = parse_sizes(args.sizes)
    workers = [int(w) for w in args.workers.split(",")]
    batch = min(args.batch_size, args.images)
    n_val = max(len(CLASSES), args.images // 4)  # every class folder holds a val image
    machine = machine_info()
    retain = not args.glibc_defaults
    # Both pipelines run in this process, under the setting the loader gives its transforms.
    machine["freed_memory_retained"] = retain and retain_freed_memory()
    print(machine_line(machine), flush=True)
    retained = "freed memory retained (RETAIN_FREED_MEMORY)"
    print(f"allocator: {retained if machine['freed_memory_retained'] else 'glibc defaults'}", flush=True)
    results: dict[str, Any] = {
        "machine": machine,
        "settings": {
            "images": args.images,
            "val_images": n_val,
            "rounds": args.rounds,
            "batch_size": batch,
            "batches": args.batches,
            "workers": workers,
            "img_size": 224,
            "recipe": "timm create_transform: RandomResizedCrop bicubic, flip, rand-m9-mstd0.5-inc1, reprob 0.25",
        },
        "sizes": {},
    }
    for w, h in sizes:
        name = f"{w}x{h}"
        root = os.path.join(out_dir, name)
        fresh_scratch(root, {"size": [w, h], "images": args.images, "val_images": n_val})
        info = make_image_folder(os.path.join(root, "folder"), (w, h), args.images, n_val)
        paths = write_layouts(root)
        train_paths = image_paths(os.path.join(paths["folder"], "train"))
        val_paths = image_paths(os.path.join(paths["folder"], "val"))
        transforms = bench_transforms(train_paths, val_paths, args.rounds, retain, batch)
        loaders = bench_loaders(paths, workers, batch, args.batches, args.rounds, retain)
        results["sizes"][name] = {"images": info, "transform": transforms, "loader": loaders}
        print("\n" + size_table(name, info, transforms, loaders, args.rounds), flush=True)
    ratios = {f"{name} train": r["transform"]["ratio"] for name, r in results["sizes"].items()}
    ratios.update({f"{name} val": r["transform"]["val_ratio"] for name, r in results["sizes"].items()})
    met, line = goal_line(ratios)
    machine_after = list(os.getloadavg())
    results["machine"]["load_average_after"] = machine_after
    results["goal"] = {"target": GOAL, "met": met, "ratios": ratios}
    print("\n" + line)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in machine_after)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        results = run(args, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="benchmark_data_") as tmp:
            results = run(args, tmp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
