"""Classify images with a trained Swin Transformer: top-k classes and probabilities per image.

    python scripts/predict.py --resume CKPT IMAGE_OR_FOLDER... [--cfg CONFIG] [--topk 5]
                              [--batch-size 32] [--json] [--compile] [--device auto|cpu|cuda]

Folders are searched recursively for images. Preprocessing is the evaluation transform of the
config (``data.build_transform(False, config)``) and the forward pass is ``main.py --eval``'s
(``inference.py``: the run's autocast; with ``--compile``, the compiled inference path), so the
predictions are the ones evaluation scores. The model is
built from --cfg, else from the config stored in the checkpoint (ours, or the yacs config of an
official training checkpoint; its ``MODEL.TYPE`` picks Swin V1 or V2; the weights must be of
that family); its number of classes is the checkpoint's. Class
names: the checkpoint's 'class_names'; else, for a 1,000-class model, the ImageNet-1K names timm
ships; else the class indices. ``--json`` prints
``[{"path": ..., "top": [{"class": ..., "index": ..., "prob": ...}, ...]}, ...]``.
An unreadable image among others is named on stderr and skipped: the others are classified and
the exit status stays 0. A missing path, a folder without images, an unreadable checkpoint, or
images none of which can be read (a single unreadable image given alone, say) is a one-line
error and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from errors import UserError, report_user_errors  # noqa: E402
from models.compile import run_eagerly  # noqa: E402

logger = logging.getLogger("swin.predict")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _image_extensions() -> tuple:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(e.lower() for e in IMG_EXTENSIONS)


def find_images(inputs: Sequence[str]) -> list[str]:
    """Image files named in ``inputs``: files as given, folders searched recursively (sorted,
    hidden entries skipped). Raises UserError for a missing path or a folder without images."""
    if not inputs:
        raise UserError("name at least one image or folder")
    exts = _image_extensions()
    found: list[str] = []
    for item in inputs:
        if os.path.isfile(item):
            found.append(item)
        elif os.path.isdir(item):
            before = len(found)
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and name.lower().endswith(exts):
                        found.append(os.path.join(dirpath, name))
            if len(found) == before:
                raise UserError(f"folder {item} holds no images ({', '.join(exts[:4])}, ...)")
        else:
            raise UserError(f"{item} does not exist; pass image files or folders of images")
    return found


# ---------------------------------------------------------------------------------------------
# Model and class names
# ---------------------------------------------------------------------------------------------
def load_classifier(
    resume: str, cfg: str | None = None, opts: Sequence[str] | None = None, device: torch.device | str = "cpu"
) -> tuple:
    """(model in eval mode on ``device``, config, class names) for checkpoint ``resume``."""
    from checkpoint import load_checkpoint_file
    from config import config_for_checkpoint, require_classifier
    from data.class_names import resolve_class_names
    from models import build_model, load_weights

    checkpoint = load_checkpoint_file(resume)
    config = config_for_checkpoint(checkpoint, cfg, opts, source=resume)
    require_classifier(config, resume)
    model = build_model(config)
    load_weights(model, checkpoint, "inference", name=resume)
    model.to(device)
    model.eval()
    return model, config, resolve_class_names(checkpoint, config.MODEL.NUM_CLASSES)


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------
class UnreadableImage(UserError):
    """An input image that cannot be decoded; ``path`` names it for the skip report."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path} ({reason})")
        self.path = path
        self.reason = reason


def _read(path: str, transform: Callable) -> torch.Tensor:
    from data.robust import UNREADABLE_ERRORS, load_rgb, unreadable_reason

    try:
        image = load_rgb(path)
    except UNREADABLE_ERRORS as e:
        raise UnreadableImage(path, unreadable_reason(e)) from None
    return transform(image)


def _none_readable(skipped: Sequence[UnreadableImage]) -> UserError:
    """The error for inputs of which no image could be read: the file's own message for one."""
    if len(skipped) == 1:
        return UserError(str(skipped[0]))
    named = ", ".join(s.path for s in skipped[:3])
    more = f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return UserError(f"none of the {len(skipped)} images can be read: {named}{more}; check the files")


@torch.no_grad()
def predict(
    model: nn.Module,
    transform: Callable,
    paths: Sequence[str],
    class_names: Sequence[str] | None = None,
    topk: int = 5,
    batch_size: int = 32,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Top-``topk`` classes of each readable image, in batches of ``batch_size``.

    Returns ``[{"path": p, "top": [{"class": name, "index": i, "prob": p}, ...]}, ...]`` in the
    order of ``paths``, most probable first. An image that cannot be read is logged as a warning
    naming it and left out (never replaced by another, and one bad file does not sink the rest);
    when no image at all can be read, the ``UserError`` names them (for a single path, its own
    "cannot read image" message). ``autocast`` (a factory of context managers) wraps the forward
    pass; the model's device is used for the inputs.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    model.eval()
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    skipped: list[UnreadableImage] = []
    for start in range(0, len(paths), batch_size):
        chunk, tensors = [], []
        for path in paths[start : start + batch_size]:
            try:
                tensors.append(_read(path, transform))
            except UnreadableImage as e:
                skipped.append(e)
                continue
            chunk.append(path)
        if not chunk:
            continue
        images = torch.stack(tensors).to(device)
        # A chunk thinned by unreadable images has a one-off size: eagerly, so that a compiled
        # model (--compile) takes the size of the whole chunks.
        thinned = len(chunk) < len(paths[start : start + batch_size])
        precision = autocast() if autocast is not None else contextlib.nullcontext()
        with precision, run_eagerly() if thinned else contextlib.nullcontext():
            logits = model(images)
        probs = logits.float().softmax(dim=-1)
        k = min(topk, probs.shape[-1])
        top_p, top_i = probs.topk(k, dim=-1)
        for path, ps, idx in zip(chunk, top_p.tolist(), top_i.tolist(), strict=True):
            results.append(
                {
                    "path": path,
                    "top": [
                        {
                            "class": class_names[i] if class_names is not None else str(i),
                            "index": int(i),
                            "prob": float(p),
                        }
                        for p, i in zip(ps, idx, strict=True)
                    ],
                }
            )
    if skipped and not results:
        raise _none_readable(skipped)
    # Reported once the outcome is known, so an all-unreadable input gives the one error line only.
    for e in skipped:
        logger.warning("%s; skipped", e)
    if len(skipped) > 1:
        logger.warning("%d of %d images skipped as unreadable", len(skipped), len(paths))
    return results


def format_predictions(results: Sequence[dict[str, Any]]) -> str:
    """Text output: each path, then its classes ranked, with probability and class index."""
    lines: list[str] = []
    width = min(40, max((len(t["class"]) for r in results for t in r["top"]), default=1))
    for r in results:
        lines.append(r["path"])
        for rank, t in enumerate(r["top"], 1):
            lines.append(f"  {rank}. {t['class']:<{width}}  {100 * t['prob']:6.2f}%  (class {t['index']})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (searched recursively)"
    )
    p.add_argument(
        "--resume",
        required=True,
        help="checkpoint to load (a main.py checkpoint, released weights or an official training checkpoint)",
    )
    p.add_argument("--cfg", help="config YAML (default: the config stored in the checkpoint)")
    p.add_argument("--opts", nargs="+", default=None, help="config overrides: KEY VALUE pairs")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the model for inference first (frozen weights, bf16 where the CPU has it natively; "
        "backend TRAIN.COMPILE_BACKEND); pays for many images",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default auto: CUDA when available)"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from data.build import build_transform
    from distributed import Precision, init_distributed
    from inference import inference_model

    paths = find_images(args.inputs)
    env = init_distributed(args.device)
    model, config, class_names = load_classifier(args.resume, args.cfg, args.opts, env.device)
    transform = build_transform(False, config)
    precision = Precision.decide(env.device, config.AMP_ENABLE, config.AMP_DTYPE)
    model, precision = inference_model(
        model, env.device, precision, args.compile, config.TRAIN.COMPILE_BACKEND, config.RETAIN_FREED_MEMORY
    )
    results = predict(
        model,
        transform,
        paths,
        class_names,
        topk=args.topk,
        batch_size=args.batch_size,
        autocast=precision.autocast,
    )
    print(json.dumps(results, indent=1) if args.json else format_predictions(results))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from distributed import cleanup

    # Skipped images are reported on stderr like errors, keeping stdout (text or JSON) clean.
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(warnings)
    try:
        return report_user_errors(lambda: run(args))
    finally:
        logger.removeHandler(warnings)
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
