"""Walk one image through a Swin Transformer (V1 or V2) and draw the paper's figures from the real model.

    python scripts/explain.py --cfg configs/swin_tiny.yaml [--img-size 224] [--out output/explain]
    python scripts/explain.py --cfg configs/demo/swin_demo_digits.yaml --resume CKPT --image IMG \
        [--block 1.2] [--head 0] [--queries 8,8 15,15]

The command line only: it builds the model (random weights, or --resume's), prints the walk of
:mod:`explainer.walk` (every stage and block with its windows, shift and the tensor shapes, read
off the real model by forward hooks; parameters and MACs per stage) and draws the figures of
:mod:`explainer.figures`.

Pictures written to --out (PNG): ``windows.png`` (regular and shifted window partition, paper
Fig. 2), ``cyclic_shift_mask.png`` (cyclic shift and the model's own attention mask, Fig. 4),
``relative_position.png`` (relative position index and one head's bias B: V1's learned table,
V2's table 16·σ(MLP(Δ̂)) computed by the position-bias MLP), and with --resume and --image
``attention.png`` (attention of a few query tokens of one block and head over their window, on
top of the image). Stages and blocks are numbered from 1 (``--block 1.2`` is stage 1, block 2,
as the walk prints them); heads from 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from config import model_section  # noqa: E402
from errors import UserError, report_user_errors  # noqa: E402
from explainer.figures import (  # noqa: E402
    plot_attention,
    plot_cyclic_shift_mask,
    plot_relative_position,
    plot_windows,
)
from explainer.walk import BlockId, build_for_walk, find_record, format_walk, trace, walk  # noqa: E402
from models.swin_transformer import SwinTransformer  # noqa: E402

# The walk and the figures live in the ``explainer`` package; they are re-exported here for callers
# of ``scripts/explain.py`` as a module (the tests: ``explain.trace``, ``explain.plot_windows``, ...).
__all__ = [
    "build_for_walk",
    "find_record",
    "format_walk",
    "main",
    "parse_args",
    "plot_attention",
    "plot_cyclic_shift_mask",
    "plot_relative_position",
    "plot_windows",
    "run",
    "trace",
    "walk",
]


def parse_block(text: str) -> BlockId:
    try:
        s, b = text.split(".")
        return int(s), int(b)
    except ValueError:
        raise UserError(f"--block takes STAGE.BLOCK counted from 1, e.g. 1.2; got {text!r}") from None


def parse_queries(items: Sequence[str] | None) -> list[tuple[int, int]] | None:
    if not items:
        return None
    out = []
    for item in items:
        try:
            r, c = item.split(",")
            out.append((int(r), int(c)))
        except ValueError:
            raise UserError(f"--queries takes ROW,COL token positions, e.g. 8,8; got {item!r}") from None
    return out


def default_block(model: SwinTransformer) -> BlockId:
    """The first shifted block of stage 1 (its attention shows the mask at work), else block 1.1."""
    for bi, blk in enumerate(model.layers[0].blocks, 1):
        if blk.shift_size:
            return (1, bi)
    return (1, 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", help="config YAML (default with --resume: the config stored in the checkpoint)")
    p.add_argument("--opts", nargs="+", default=None, help="config overrides: KEY VALUE pairs")
    p.add_argument("--img-size", type=int, help="input size to walk (default DATA.IMG_SIZE)")
    p.add_argument(
        "--out", default=os.path.join("output", "explain"), help="folder for the pictures (default output/explain)"
    )
    p.add_argument("--resume", help="checkpoint whose weights to use (bias picture, attention maps)")
    p.add_argument("--image", help="image to walk and draw attention maps for (needs --resume)")
    p.add_argument(
        "--block",
        help="STAGE.BLOCK counted from 1 for the bias and attention pictures "
        "(default: the first shifted block of stage 1)",
    )
    p.add_argument("--head", type=int, default=0, help="attention head, counted from 0 (default 0)")
    p.add_argument("--queries", nargs="+", help="query tokens ROW,COL on the block's map for attention.png")
    p.add_argument("--no-pictures", action="store_true", help="print the walk only")
    return p.parse_args(argv)


def load_config(cfg: str | None, opts: Sequence[str] | None) -> CfgNode:
    """The config of a walk without a checkpoint: ``--cfg`` with ``--opts``."""
    from config import get_config

    if cfg:
        return get_config(cfg, opts)
    raise UserError("pass --cfg (or --resume with a checkpoint that stores its config)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from checkpoint import load_checkpoint_file
    from config import config_for_checkpoint, require_classifier
    from data.build import build_transform
    from data.class_names import resolve_class_names
    from data.robust import load_rgb_or_user_error
    from models import load_weights

    if args.image and not args.resume:
        raise UserError("--image draws the attention of trained weights; pass --resume CKPT as well")
    if args.image and not os.path.isfile(args.image):
        raise UserError(f"image {args.image} does not exist")
    checkpoint = load_checkpoint_file(args.resume) if args.resume else None
    if checkpoint is not None:
        config = config_for_checkpoint(checkpoint, args.cfg, args.opts, source=args.resume)
    else:
        config = load_config(args.cfg, args.opts)
    require_classifier(config, args.resume or args.cfg)
    trained_size = int(config.DATA.IMG_SIZE)
    if args.image and args.img_size and args.img_size != trained_size:
        raise UserError(
            f"--img-size {args.img_size} differs from the {trained_size}x{trained_size} the checkpoint's "
            "preprocessing makes of --image; leave --img-size out"
        )
    class_names: list[str] | None = None
    model, config = build_for_walk(config, args.img_size)
    weights = "random init (seed 0)"
    if checkpoint is not None:
        load_weights(model, checkpoint, "inference", name=args.resume)
        class_names = resolve_class_names(checkpoint, config.MODEL.NUM_CLASSES)
        weights = os.path.basename(args.resume)
    size = int(config.DATA.IMG_SIZE)
    if args.image:
        images = build_transform(False, config)(load_rgb_or_user_error(args.image)).unsqueeze(0)
    else:
        images = torch.randn(1, model_section(config).IN_CHANS, size, size, generator=torch.Generator().manual_seed(0))
    result = trace(model, images)
    print(format_walk(result.records, f"{config.MODEL.NAME} at {size}×{size}"))
    written: dict[str, str] = {}
    if not args.no_pictures:
        block = parse_block(args.block) if args.block else default_block(model)
        out = args.out
        plot_windows(model, os.path.join(out, "windows.png"))
        written["windows"] = os.path.join(out, "windows.png")
        plot_cyclic_shift_mask(model, os.path.join(out, "cyclic_shift_mask.png"))
        written["cyclic_shift_mask"] = os.path.join(out, "cyclic_shift_mask.png")
        plot_relative_position(model, os.path.join(out, "relative_position.png"), block, args.head, weights)
        written["relative_position"] = os.path.join(out, "relative_position.png")
        if args.image:
            info = plot_attention(
                model,
                images[0],
                os.path.join(out, "attention.png"),
                block,
                args.head,
                parse_queries(args.queries),
                class_names,
                title=os.path.basename(args.image),
            )
            written["attention"] = os.path.join(out, "attention.png")
            print(
                f"\nprediction for {args.image}: "
                f"{class_names[info['prediction'][0]] if class_names else info['prediction'][0]} "
                f"({100 * info['prediction'][1]:.1f}%)"
            )
        print()
        for path in written.values():
            print(f"wrote {path}")
    return {"records": result.records, "pictures": written}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
