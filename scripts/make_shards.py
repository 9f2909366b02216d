"""Write an ImageFolder as WebDataset-style tar shards that main.py reads with DATA.FORMAT shards.

    python scripts/make_shards.py --data-path /data/imagenet --out /data/imagenet-shards [--shard-size N]
        [--max-bytes 1G] [--seed 0] [--overwrite]
    python scripts/make_shards.py --index /data/other-shards/train     # index shards written elsewhere

Input: --data-path holding train/<class>/ and val/<class>/ (the same class folders; val/ optional).

Output (OUT):
  train/000000.tar, 000001.tar, ...   sample i (its index in ImageFolder's order) as two members:
                                      <i:08d>.<original extension> (the file's bytes, unchanged) and
                                      <i:08d>.cls (the class index as text); the training images are
                                      shuffled across shards with --seed, so each shard mixes classes
  val/000000.tar, ...                 the same, in ImageFolder's order
  train/shards.json, val/shards.json  samples and bytes of each shard, the class names

A shard closes after --shard-size samples or before it would pass --max-bytes (default 1G: about
9,000 ImageNet images; both apply when both are given). Shards are written under a temporary name
and renamed, shards.json last; the same input and options write the same bytes. Train with:

    python main.py --cfg configs/swin_tiny.yaml --data-path /data/imagenet-shards --opts DATA.FORMAT shards

--index DIR counts the samples of the .tar shards in DIR (tar headers and .cls members) and writes
DIR/shards.json, so that main.py does not count them at every start; the class names are those of
an existing shards.json, else "0", "1", ....
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

# Run as `python scripts/make_shards.py`: make the repository's modules importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import clear_shard_folder, index_existing_shards, split_classes, write_split_shards  # noqa: E402
from errors import UserError, report_user_errors  # noqa: E402
from logger import script_console  # noqa: E402

logger = logging.getLogger("swin.make_shards")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``1000000``, ``500M``, ``1G``, ``1.5GiB`` (powers of 1024); 0 means no limit."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"--max-bytes {text!r} is not a size; use bytes or a suffix, e.g. 500M or 1G")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-path", help="ImageFolder root holding train/<class>/ and val/<class>/")
    p.add_argument("--out", help="output folder: OUT/train/*.tar, OUT/val/*.tar with shards.json")
    p.add_argument("--shard-size", type=int, default=0, help="samples per shard (default: no count limit)")
    p.add_argument("--max-bytes", default="1G", help="bytes per shard at most, e.g. 500M (default 1G; 0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training set's shuffle across shards")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT/train and OUT/val")
    p.add_argument("--index", metavar="DIR", help="only write DIR/shards.json for the .tar shards in DIR")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.index:
        if args.data_path or args.out:
            raise UserError("--index writes the index of existing shards; drop --data-path and --out")
        index_existing_shards(args.index)
        return
    if not args.data_path or not args.out:
        raise UserError("pass --data-path (an ImageFolder with train/ and val/) and --out, or --index DIR")
    if args.shard_size < 0:
        raise UserError(f"--shard-size is {args.shard_size}; use a positive count, or 0 for no count limit")
    max_bytes = parse_size(args.max_bytes)
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path} does not exist")
    if os.path.abspath(args.out) == os.path.abspath(args.data_path):
        raise UserError("--out is --data-path; write the shards to another folder")
    classes = split_classes(args.data_path)
    splits = [s for s in ("train", "val") if os.path.isdir(os.path.join(args.data_path, s))]
    for split in splits:
        clear_shard_folder(os.path.join(args.out, split), args.overwrite)
    for split in splits:
        write_split_shards(
            os.path.join(args.data_path, split),
            os.path.join(args.out, split),
            classes,
            shuffle_seed=args.seed if split == "train" else None,
            shard_size=args.shard_size,
            max_bytes=max_bytes,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with script_console(logger.name, "data.shards"):
        return report_user_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
