"""Turn the ILSVRC2012 downloads into the layouts main.py reads: class folders, and with --zip the zip layout.

    python scripts/prepare_imagenet.py --out /data/imagenet \\
        --train ILSVRC2012_img_train/ --val ILSVRC2012_img_val/ \\
        --val-labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \\
        --devkit-meta ILSVRC2012_devkit_t12/data/meta.mat [--link] [--zip]

Inputs:
  --train        a folder of per-class tar files (n01440764.tar, ... as inside ILSVRC2012_img_train.tar),
                 a folder of per-class folders (n01440764/, ...), or ILSVRC2012_img_train.tar itself.
  --val          the flat folder of ILSVRC2012_val_00000001.JPEG, ..., or ILSVRC2012_img_val.tar.
  --val-labels   the val ground truth, one of:
                 * the devkit's ILSVRC2012_validation_ground_truth.txt (line k: the ILSVRC2012_ID of
                   ILSVRC2012_val_<k>.JPEG), with --devkit-meta;
                 * a CSV 'ImageId,PredictionString' (Kaggle's LOC_val_solution.csv; the first word of
                   PredictionString is the wnid);
                 * a CSV of 'filename,wnid' rows (header optional, filename with or without extension).
  --devkit-meta  the ILSVRC2012_ID -> wnid table the ground-truth file needs: the devkit's data/meta.mat
                 (read with scipy), or a text file of 'ILSVRC2012_ID wnid' lines, written from meta.mat on
                 any machine with scipy by
                   python -c "import scipy.io; [print(s['ILSVRC2012_ID'], s['WNID']) for s in
                   scipy.io.loadmat('meta.mat', squeeze_me=True)['synsets'] if s['num_children'] == 0]"
                 The IDs follow meta.mat's order, which is NOT the sorted wnid order (ID 1 is n02119789),
                 so a sorted list such as LOC_synset_mapping.txt must not be used as this table.

Output (OUT):
  train/<wnid>/<file>.JPEG, val/<wnid>/<file>.JPEG   the class folders (every training class also gets a
                                                     val folder); copies, or hard links with --link
                                                     where the input is a folder (tar members are written)
  with --zip: train.zip, val.zip (ZIP_STORED), train_map.txt, val_map.txt ('<wnid>/<file><TAB><label>',
  label = index of the wnid among the sorted training wnids), written from the class folders; --zip
  alone converts an existing class-folder layout in OUT.

Reruns are cheap: files already in place (same size) are skipped and a complete zip is kept, so an
interrupted run continues where it stopped. Files are written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Run as `python scripts/prepare_imagenet.py`: make the repository's modules importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: E402

from data.zip_dataset import map_path, write_zip_split, zip_path  # noqa: E402
from errors import UserError, report_user_errors  # noqa: E402
from logger import script_console  # noqa: E402

logger = logging.getLogger("swin.prepare_imagenet")

VAL_NAME = "ILSVRC2012_val_{:08d}"
# Seconds between progress lines within one long step.
PROGRESS_EVERY_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (the --data-path of main.py)")
    p.add_argument("--train", help="per-class tars or folders, or ILSVRC2012_img_train.tar")
    p.add_argument("--val", help="flat folder of val images, or ILSVRC2012_img_val.tar (needs --val-labels)")
    p.add_argument("--val-labels", help="devkit ground-truth .txt (with --devkit-meta), or a CSV (see below)")
    p.add_argument("--devkit-meta", help="devkit meta.mat, or a text file of 'ILSVRC2012_ID wnid' lines")
    p.add_argument("--link", action="store_true", help="hard-link images from input folders instead of copying")
    p.add_argument("--zip", action="store_true", help="also write train.zip, val.zip, train_map.txt, val_map.txt")
    return p.parse_args(argv)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _visible_dirs(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _visible_dirs_if(out: str, split: str) -> list[str] | None:
    """The class folders of OUT/split when there are any."""
    folder = os.path.join(out, split)
    return (_visible_dirs(folder) or None) if os.path.isdir(folder) else None


# -----------------------------------------------------------------------------
# Writing one image
# -----------------------------------------------------------------------------
@dataclass
class Source:
    """One input image: a file on disk, or bytes fetched from a tar member (called at once)."""

    name: str
    size: int
    path: str | None = None
    fetch: Callable[[], bytes] | None = None


@dataclass
class Placer:
    """Puts images into OUT; counts what it wrote and skipped."""

    link: bool
    written: int = 0
    skipped: int = 0
    _link_failed: bool = False

    def place(self, src: Source, dest: str) -> None:
        if os.path.isfile(dest) and os.path.getsize(dest) == src.size:
            self.skipped += 1
            return
        tmp = dest + ".partial"
        if os.path.lexists(tmp):  # left by an interrupted run
            os.remove(tmp)
        if src.path is not None:
            linked = False
            if self.link and not self._link_failed:
                try:
                    os.link(src.path, tmp)
                    linked = True
                except OSError as e:
                    self._link_failed = True
                    logger.warning("cannot hard-link %s into %s (%s); copying instead", src.path, dest, e.strerror)
            if not linked:
                shutil.copyfile(src.path, tmp)
        else:
            assert src.fetch is not None
            with open(tmp, "wb") as f:
                f.write(src.fetch())
        os.replace(tmp, dest)
        self.written += 1


def _tar_members(tar: tarfile.TarFile, where: str) -> Iterator[tarfile.TarInfo]:
    """The members of an open (streamed) tar; a damaged tar is a ``UserError`` naming it."""
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            return
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"{where} is damaged ({e}); download it again") from e
        yield member


def _tar_images(tar: tarfile.TarFile, where: str) -> Iterator[Source]:
    """The image members of an open (streamed) tar, flat names; each must be fetched before the next."""

    def fetch(member: tarfile.TarInfo) -> bytes:
        try:
            f = tar.extractfile(member)
            if f is None:
                raise tarfile.TarError(f"{member.name} has no data")
            return f.read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"{where} is damaged ({e}); download it again") from e

    for member in _tar_members(tar, where):
        if member.isfile() and _is_image(member.name):
            yield Source(os.path.basename(member.name), member.size, fetch=lambda m=member: fetch(m))


def _folder_images(folder: str) -> Iterator[Source]:
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if e.is_file() and _is_image(e.name)), key=lambda e: e.name)
    for e in entries:
        yield Source(e.name, e.stat().st_size, path=e.path)


def _tar_file_names(path: str) -> list[str]:
    """The names of a tar file's regular members, read from their headers only (an uncompressed
    tar, as ImageNet's are, is skipped through by seeking: seconds for the 138 GB train tar)."""
    try:
        with tarfile.open(path, mode="r:*") as tar:
            return [m.name for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{path} is damaged ({e}); download it again") from e


def _open_tar(path: str, fileobj=None) -> tarfile.TarFile:
    try:
        return tarfile.open(path if fileobj is None else None, mode="r|*", fileobj=fileobj)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read {path} as a tar file ({e}); check the download") from e


# -----------------------------------------------------------------------------
# Train
# -----------------------------------------------------------------------------
def _train_class_sources(train: str) -> Iterator[tuple[str, str, Callable[[], Iterator[Source]]]]:
    """``(wnid, where, images)`` for each class of ``--train``."""
    if os.path.isfile(train):
        if not tarfile.is_tarfile(train):
            raise UserError(f"--train {train} is a file but not a tar; pass ILSVRC2012_img_train.tar or a folder")
        with _open_tar(train) as outer:
            for member in _tar_members(outer, train):
                if not (member.isfile() and member.name.endswith(".tar")):
                    continue
                wnid = os.path.basename(member.name)[: -len(".tar")]
                inner_file = outer.extractfile(member)
                where = f"{train}:{member.name}"

                def images(f=inner_file, where=where) -> Iterator[Source]:
                    with _open_tar(where, fileobj=f) as inner:
                        yield from _tar_images(inner, where)

                yield wnid, where, images
        return
    for wnid, (kind, path) in _train_folder_classes(train).items():
        if kind == "folder":

            def images(folder=path) -> Iterator[Source]:
                yield from _folder_images(folder)

        else:

            def images(tar_file=path) -> Iterator[Source]:
                with _open_tar(tar_file) as tar:
                    yield from _tar_images(tar, tar_file)

        yield wnid, path, images


def _train_folder_classes(train: str) -> dict[str, tuple[str, str]]:
    """wnid -> ('folder' or 'tar', path) for a --train folder, in sorted wnid order."""
    if not os.path.isdir(train):
        raise UserError(f"--train {train} does not exist; pass the folder of per-class tars or folders")
    with os.scandir(train) as it:
        tars = {
            e.name[: -len(".tar")]: e.path
            for e in it
            if e.is_file() and e.name.endswith(".tar") and not e.name.startswith(".")
        }
    folders = {name: os.path.join(train, name) for name in _visible_dirs(train)}
    if not tars and not folders:
        raise UserError(f"--train {train} holds no per-class .tar files or class folders; pass the folder that does")
    # An extracted class wins over its tar.
    return {w: ("folder", folders[w]) if w in folders else ("tar", tars[w]) for w in sorted(set(tars) | set(folders))}


def prepare_train(train: str, out: str, placer: Placer) -> list[str]:
    """Write OUT/train/<wnid>/; returns the sorted wnids."""
    wnids: list[str] = []
    total = 0
    for wnid, where, images in _train_class_sources(train):
        if wnid.startswith(".") or not wnid:
            continue
        dest_dir = os.path.join(out, "train", wnid)
        os.makedirs(dest_dir, exist_ok=True)
        written = placer.written
        n = 0
        for src in images():
            placer.place(src, os.path.join(dest_dir, src.name))
            n += 1
        if n == 0:
            logger.warning("train class %s (%s) holds no images", wnid, where)
        wnids.append(wnid)
        total += n
        logger.info("train %d: %s, %d images (%d written)", len(wnids), wnid, n, placer.written - written)
    if not wnids:
        raise UserError(f"--train {train} holds no per-class tars or folders; pass the folder that does")
    logger.info("train: %d images in %d classes", total, len(wnids))
    return sorted(wnids)


# -----------------------------------------------------------------------------
# Val labels
# -----------------------------------------------------------------------------
def read_devkit_meta(path: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat or a text file of 'ID wnid' lines."""
    if not os.path.isfile(path):
        raise UserError(f"--devkit-meta {path} does not exist; pass the devkit's data/meta.mat")
    table: dict[int, str] = {}
    if path.endswith(".mat"):
        try:
            import scipy.io
        except ImportError as e:
            raise UserError(
                "reading meta.mat needs scipy (pip install scipy); or pass a text file of 'ILSVRC2012_ID wnid' "
                "lines (see --help)"
            ) from e
        try:
            synsets = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
            for s in synsets.flat:
                table[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
        except (KeyError, ValueError, TypeError, NotImplementedError, OSError) as e:
            raise UserError(f"{path} is not the devkit's meta.mat (no synsets with ILSVRC2012_ID and WNID: {e})") from e
        return table
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = re.split(r"[,\s]+", line.strip(), maxsplit=2)
            if len(fields) < 2 or not fields[0].isdigit():
                raise UserError(
                    f"{path} line {number} is {line.strip()[:60]!r}; each line must be 'ILSVRC2012_ID wnid'"
                )
            table[int(fields[0])] = fields[1]
    if not table:
        raise UserError(f"{path} holds no 'ILSVRC2012_ID wnid' lines")
    return table


def _first_line(path: str) -> str:
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                return line.strip()
    raise UserError(f"--val-labels {path} is empty")


def read_val_labels(path: str, meta: str | None) -> dict[str, str]:
    """Val image name without extension -> wnid, from the devkit ground truth or a CSV."""
    if not os.path.isfile(path):
        raise UserError(f"--val-labels {path} does not exist")
    labels: dict[str, str] = {}
    if _first_line(path).isdigit():
        if not meta:
            raise UserError(
                f"{path} holds devkit ILSVRC2012_IDs; also pass --devkit-meta with the devkit's meta.mat "
                f"(the IDs are not the sorted wnid order)"
            )
        table = read_devkit_meta(meta)
        k = 0
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                k += 1
                try:
                    wnid = table[int(line)]
                except (ValueError, KeyError):
                    raise UserError(
                        f"{path} line {number} is {line.strip()[:40]!r}, not an ILSVRC2012_ID in {meta}; "
                        f"check that both come from the same devkit"
                    ) from None
                labels[VAL_NAME.format(k)] = wnid
        return labels
    with open(path, newline="", encoding="utf-8-sig") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            fields = [x.strip() for x in row]
            if number == 1 and fields[0].lower() in ("imageid", "image_id", "filename", "file", "image", "name"):
                continue  # header
            words = fields[1].split() if len(fields) > 1 else []
            if not fields[0] or not words:
                raise UserError(
                    f"{path} line {number} is {','.join(row)[:60]!r}; rows must be 'filename,wnid' or "
                    f"'ImageId,PredictionString'"
                )
            key = os.path.splitext(os.path.basename(fields[0]))[0]
            if labels.setdefault(key, words[0]) != words[0]:
                raise UserError(f"{path} gives {key} two labels ({labels[key]} and {words[0]}); keep one row per image")
    if not labels:
        raise UserError(f"--val-labels {path} holds no labels")
    return labels


# -----------------------------------------------------------------------------
# Val
# -----------------------------------------------------------------------------
def _val_sources(val: str) -> Iterator[Source]:
    if os.path.isfile(val):
        if not tarfile.is_tarfile(val):
            raise UserError(f"--val {val} is a file but not a tar; pass the flat val folder or ILSVRC2012_img_val.tar")
        with _open_tar(val) as tar:
            yield from _tar_images(tar, val)
        return
    if not os.path.isdir(val):
        raise UserError(f"--val {val} does not exist; pass the flat folder of ILSVRC2012_val_*.JPEG")
    yield from _folder_images(val)


def _check_unlabelled(names: list[str]) -> None:
    if names:
        raise UserError(
            f"{len(names)} val image(s) have no label in --val-labels (e.g. {', '.join(names[:3])}); "
            f"pass the labels of this val set"
        )


def check_val(val: str, labels: dict[str, str], classes: list[str] | None) -> None:
    """Fail before any copying when the labels name unknown classes or (for a folder) miss an image."""
    if classes:
        unknown = sorted(set(labels.values()) - set(classes))
        if unknown:
            raise UserError(
                f"the val labels name {len(unknown)} wnids that are no training class (e.g. {', '.join(unknown[:3])}); "
                f"check --val-labels and --devkit-meta"
            )
    if os.path.isdir(val):
        with os.scandir(val) as it:
            names = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
    elif os.path.isfile(val) and tarfile.is_tarfile(val):
        names = sorted(os.path.basename(n) for n in _tar_file_names(val) if _is_image(n))
    else:
        return  # prepare_val names what --val is not
    _check_unlabelled([n for n in names if os.path.splitext(n)[0] not in labels])


def prepare_val(val: str, labels: dict[str, str], classes: list[str] | None, out: str, placer: Placer) -> int:
    """Write OUT/val/<wnid>/ from the flat val images; returns the number of images."""
    check_val(val, labels, classes)
    if classes:
        for wnid in classes:
            os.makedirs(os.path.join(out, "val", wnid), exist_ok=True)
    n, unlabelled = 0, []
    last_report = time.perf_counter()
    for src in _val_sources(val):
        wnid = labels.get(os.path.splitext(src.name)[0])
        if wnid is None:
            unlabelled.append(src.name)
            continue
        dest_dir = os.path.join(out, "val", wnid)
        os.makedirs(dest_dir, exist_ok=True)
        placer.place(src, os.path.join(dest_dir, src.name))
        n += 1
        if time.perf_counter() - last_report > PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            logger.info("val: %d images", n)
    _check_unlabelled(unlabelled)
    if n == 0:
        raise UserError(f"--val {val} holds no images; pass the flat folder of ILSVRC2012_val_*.JPEG")
    if n < len(labels):
        logger.info("val: %d of the %d labelled images are present", n, len(labels))
    logger.info("val: %d images", n)
    return n


# -----------------------------------------------------------------------------
# Zip layout
# -----------------------------------------------------------------------------
def prepare_zip(out: str) -> None:
    """Write the zip layout from OUT/train and OUT/val class folders."""
    train_dir, val_dir = os.path.join(out, "train"), os.path.join(out, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise UserError(f"--zip needs {d}; write the class folders first with --train and --val")
    classes = _visible_dirs(train_dir)
    if not classes:
        raise UserError(f"{train_dir} holds no class folders; write them first with --train")
    extra = sorted(set(_visible_dirs(val_dir)) - set(classes))
    if extra:
        raise UserError(f"{val_dir} has class folders that {train_dir} lacks ({', '.join(extra[:3])}); fix the layout")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    for split, folder in (("train", train_dir), ("val", val_dir)):
        n = write_zip_split(folder, zip_path(out, split), map_path(out, split), class_to_idx)
        if n == 0:
            raise UserError(f"{folder} holds no images to zip")


def run(args: argparse.Namespace) -> None:
    if not (args.train or args.val or args.zip):
        raise UserError("nothing to do: pass --train, --val with --val-labels, and/or --zip")
    if args.val and not args.val_labels:
        raise UserError("--val needs --val-labels (the devkit ground truth with --devkit-meta, or a CSV)")
    # Read the labels before any copying, so a bad labels file fails at once.
    labels = read_val_labels(args.val_labels, args.devkit_meta) if args.val else None
    os.makedirs(args.out, exist_ok=True)
    placer = Placer(link=args.link)
    classes = None
    if args.val:
        # Before hours of copying the train set: the val labels must fit the val images and classes.
        known = _visible_dirs_if(args.out, "train")
        if args.train and os.path.isdir(args.train):
            known = list(_train_folder_classes(args.train))
        elif args.train and os.path.isfile(args.train) and tarfile.is_tarfile(args.train):
            # The outer train tar's member names (not OUT/train, which an interrupted run left partial).
            known = sorted(
                os.path.basename(n)[: -len(".tar")] for n in _tar_file_names(args.train) if n.endswith(".tar")
            )
        assert labels is not None
        check_val(args.val, labels, known)
    if args.train:
        classes = prepare_train(args.train, args.out, placer)
    else:
        classes = _visible_dirs_if(args.out, "train")
    if args.val:
        assert labels is not None
        prepare_val(args.val, labels, classes, args.out, placer)
    if args.train or args.val:
        logger.info("%s: %d images written, %d already in place", args.out, placer.written, placer.skipped)
    if args.zip:
        prepare_zip(args.out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with script_console(logger.name, "data.zip_dataset"):
        return report_user_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
