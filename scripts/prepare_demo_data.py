"""Write scikit-learn's handwritten digits (1,797 real 8x8 images, no download) as an ImageFolder.

    python scripts/prepare_demo_data.py [--out demo_data] [--size 32] [--val-fraction 0.2] [--seed 0] [--force]

Layout: OUT/train/<digit>/<i>.png and OUT/val/<digit>/<i>.png, where i is the image's index in
``load_digits()``; the split is stratified by digit and fixed by --seed. Each image is scaled
from 0..16 to 0..255, upsampled to size x size with bicubic interpolation and saved as RGB.
A marker file records the settings; a second run with the same settings and all files present
does nothing (use --force to rewrite).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Run as `python scripts/prepare_demo_data.py`: make the repository's modules importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

MARKER = ".demo_data.json"
SPLITS = ("train", "val")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_data", help="output folder (default: demo_data)")
    p.add_argument("--size", type=int, default=32, help="side of the written images in pixels (default: 32)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of images for val/ (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="random_state of the stratified split (default: 0)")
    p.add_argument("--force", action="store_true", help="rewrite even when the folder is already complete")
    return p.parse_args(argv)


def split_indices(targets: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/val split of ``range(len(targets))``, sorted within each split."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(targets)), test_size=val_fraction, random_state=seed, stratify=targets)
    return {"train": np.sort(train), "val": np.sort(val)}


def to_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 array of values 0..16 as a size x size RGB image."""
    gray = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def count_pngs(out: str) -> dict[str, int]:
    counts = {}
    for split in SPLITS:
        n = 0
        for _, _, files in os.walk(os.path.join(out, split)):
            n += sum(f.endswith(".png") for f in files)
        counts[split] = n
    return counts


def remove_previous(out: str) -> None:
    """Delete the PNGs and digit folders an earlier run wrote (only those)."""
    for split in SPLITS:
        for digit in range(10):
            folder = os.path.join(out, split, str(digit))
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if name.endswith(".png"):
                    os.remove(os.path.join(folder, name))
            if not os.listdir(folder):
                os.rmdir(folder)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.size < 1:
        print(f"error: --size is {args.size}; use a positive image side such as 32", file=sys.stderr)
        return 2
    if not 0.0 < args.val_fraction < 1.0:
        print(f"error: --val-fraction is {args.val_fraction}; use a share between 0 and 1 such as 0.2", file=sys.stderr)
        return 2

    from sklearn.datasets import load_digits

    digits = load_digits()
    targets = digits.target
    try:
        splits = split_indices(targets, args.val_fraction, args.seed)
    except ValueError as e:
        print(
            f"error: cannot split the digits with --val-fraction {args.val_fraction} ({e}); use a value such as 0.2",
            file=sys.stderr,
        )
        return 2
    expected = {split: int(len(idx)) for split, idx in splits.items()}
    settings = {"size": args.size, "val_fraction": args.val_fraction, "seed": args.seed, "counts": expected}

    marker_path = os.path.join(args.out, MARKER)
    has_marker = os.path.isfile(marker_path)
    if os.path.isdir(args.out) and os.listdir(args.out) and not has_marker:
        # Never delete or mix into a folder this script did not write.
        print(
            f"error: {args.out} already holds files not written by this script; choose an empty or new --out folder",
            file=sys.stderr,
        )
        return 2
    if has_marker and not args.force:
        with open(marker_path) as f:
            previous = json.load(f)
        if previous == {**settings, "complete": True} and count_pngs(args.out) == expected:
            print(
                f"{args.out} already holds {expected['train']} train and {expected['val']} val images "
                f"with these settings; nothing to do (use --force to rewrite)"
            )
            return 0
    if has_marker:
        remove_previous(args.out)

    # The marker goes first, so a run stopped halfway leaves a folder the next run recognises
    # as its own (and rewrites); "complete" is set once every image is written.
    os.makedirs(args.out, exist_ok=True)
    with open(marker_path, "w") as f:
        json.dump({**settings, "complete": False}, f)
    for split, indices in splits.items():
        for digit in range(10):
            os.makedirs(os.path.join(args.out, split, str(digit)), exist_ok=True)
        for i in indices:
            path = os.path.join(args.out, split, str(int(targets[i])), f"{int(i)}.png")
            to_image(digits.images[i], args.size).save(path)
    with open(marker_path, "w") as f:
        json.dump({**settings, "complete": True}, f)
    print(
        f"wrote {expected['train']} train and {expected['val']} val images "
        f"(10 classes, {args.size}x{args.size} RGB PNG) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
