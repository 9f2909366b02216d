"""Draw what a SimMIM checkpoint reconstructs: original, masked input, prediction, and the
prediction pasted into the visible pixels, one row per image, into one PNG.

    python scripts/simmim_reconstruct.py --resume output/simmim_demo_digits/default/ckpt_epoch_29.pth \
        --data-path demo_data [--count 6] [--seed 0] [--out output/simmim_reconstruction.png]

Images come from ``--images`` (files or folders) or else from the ``val/`` (or ``train/``) folder
of ``--data-path``, the checkpoint's own data folder by default. Each image gets the evaluation
crop and a random mask drawn from ``--seed`` and its row. With a normalised target
(``MODEL.SIMMIM.NORM_TARGET``) the prediction is mapped back to pixels with the original's own
neighbourhood mean and std, so it can be shown. The masked-pixel L1 of the drawn batch is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

from checkpoint import load_checkpoint_file  # noqa: E402
from config import config_for_checkpoint, is_pretraining  # noqa: E402
from data.robust import load_rgb_or_user_error  # noqa: E402
from data.sample_seeds import seeded_rngs  # noqa: E402
from data.simmim import SimMIMTransform, image_files, pretraining_folders  # noqa: E402
from errors import UserError, report_user_errors  # noqa: E402
from models import build_model, load_weights  # noqa: E402
from models.simmim import SimMIM, local_mean_std, pixel_mask  # noqa: E402


def load_simmim(path: str) -> tuple[SimMIM, object]:
    """The SimMIM model of a pre-training checkpoint of this project, in eval mode, and its config."""
    checkpoint = load_checkpoint_file(path)
    config = config_for_checkpoint(checkpoint, source=path)
    if not is_pretraining(config):
        raise UserError(f"{path} is not a SimMIM pre-training checkpoint (TRAIN.PRETRAIN is not 'simmim')")
    model = build_model(config)
    load_weights(model, checkpoint, "resume", name=path)
    return model.eval(), config


def choose_images(paths: Sequence[str] | None, data_path: str, count: int) -> list[str]:
    """The first ``count`` images of ``paths`` (files or folders), else of ``data_path``'s val/ or train/."""
    found: list[str] = []
    if paths:
        for p in paths:
            if not os.path.exists(p):
                raise UserError(f"--images {p} does not exist; pass image files or folders")
            found.extend(image_files(p) if os.path.isdir(p) else [p])
    else:
        train, val = pretraining_folders(data_path)
        found = image_files(val or train)
    if not found:
        raise UserError("no images to draw; pass --images FILES or a --data-path with images")
    # Spread over the folder (class folders are sorted: the first N would all be one class).
    step = max(1, len(found) // count)
    return found[::step][:count]


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image → (H, W, 3) floats in [0, 1] for display."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def reconstruct(model: SimMIM, config, files: Sequence[str], seed: int) -> dict[str, torch.Tensor]:
    """Images, masks (token level), predictions in normalised-image space, and the masked L1 loss."""
    transform = SimMIMTransform(config, is_train=False)
    pairs = []
    for row, path in enumerate(files):
        with seeded_rngs(seed + row):
            pairs.append(transform(load_rgb_or_user_error(path)))
    images = torch.stack([p[0] for p in pairs])
    masks = torch.stack([p[1] for p in pairs])
    loss = model(images, masks)
    prediction = model.reconstruct(images, masks).float()
    if model.norm_target:
        # The decoder predicts locally normalised pixels: undo that with the original's statistics.
        mean, std = local_mean_std(images, model.norm_target_window)
        prediction = prediction * std + mean
    return {"images": images, "masks": masks, "prediction": prediction, "loss": loss}


def draw(result: dict[str, torch.Tensor], patch_size: int, out: str) -> str:
    """One row per image: original | masked | prediction | visible + prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, prediction = result["images"], result["prediction"]
    pix = pixel_mask(result["masks"], patch_size)  # (B, 1, H, W)
    grey = torch.zeros_like(images)  # 0 in normalised space: the dataset-mean grey
    columns = {
        "original": images,
        "masked input": images * (1 - pix) + grey * pix,
        "prediction": prediction,
        "visible + prediction": images * (1 - pix) + prediction * pix,
    }
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.0 * len(columns), 2.0 * rows), squeeze=False)
    for c, (title, batch) in enumerate(columns.items()):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(to_pixels(batch[r]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"SimMIM reconstruction, masked-pixel L1 {float(result['loss']):.3f}", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resume", required=True, help="a checkpoint of main.py --pretrain simmim")
    p.add_argument("--images", nargs="+", help="image files or folders (default: from --data-path)")
    p.add_argument("--data-path", "--data_path", help="data folder (default: the checkpoint's DATA.DATA_PATH)")
    p.add_argument("--count", type=int, default=6, help="images to draw (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")
    p.add_argument("--out", default="output/simmim_reconstruction.png", help="PNG to write")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    if args.count < 1:
        raise UserError(f"--count is {args.count}; draw at least one image")
    model, config = load_simmim(args.resume)
    files = choose_images(args.images, args.data_path or config.DATA.DATA_PATH, args.count)
    result = reconstruct(model, config, files, args.seed)
    out = draw(result, model.patch_size, args.out)
    sys.stdout.write(f"{len(files)} images, masked-pixel L1 {float(result['loss']):.4f}; wrote {out}\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
