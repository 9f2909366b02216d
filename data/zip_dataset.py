"""The official zip layout: ``train.zip``, ``val.zip``, ``train_map.txt``, ``val_map.txt``.

Each map line is ``relative/path<TAB>label`` (an int in ``[0, num_classes)``); the image is the
zip member stored at that path. ``ZipImageDataset`` reads one split with the attributes
``RobustImageDataset`` needs, so exact evaluation, corrupt-image handling and the resumable
sampler behave as for class folders, and the same images give the same tensors.

Reading. The zip's central directory is parsed once, in the process that builds the dataset,
into a few NumPy arrays (offset, sizes, CRC, method and cache slot of each listed member, about
40 bytes per image), then the ``ZipFile`` is closed. ``zipfile.ZipFile`` itself keeps a
``ZipInfo`` of about 550 bytes per member (measured: 110 MB for 200,000 members, ~700 MB for
ImageNet-1K's train set) and takes seconds to parse; opened in every loader worker of every
rank, that would cost tens of GB per node. Each process (the main one and every DataLoader
worker, detected by a change of pid) instead opens the zip file once, lazily, and reads a member
with two ``os.pread`` calls (local header, data); the open file is never pickled. Members must
be stored (``ZIP_STORED``, what ``scripts/prepare_imagenet.py --zip`` writes) or deflated; every
read checks the CRC.

Cache (``DATA.CACHE_MODE``): ``no`` reads every image from the zip; ``full`` copies the bytes of
every listed member into one in-memory buffer when the dataset is built; ``part`` copies those of
the indices ``i`` with ``i % world_size == rank``. Sampling is not changed by the cache: the
training order stays ``ResumableSampler``'s global shuffle over all images, so each rank finds
about ``1/world_size`` of its reads in a ``part`` cache and reads the rest from the zip (the OS
page cache), and a run gives the same batches whatever the cache mode. The evaluation sampler
hands rank ``r`` exactly the indices ``r, r + world_size, ...``, so there ``part`` caches exactly
what the rank reads. Under the fork start method (Linux's default) loader workers share the
buffer copy-on-write; a spawn start would copy it into each worker.

A member named in a map but absent from the zip, a corrupt member and undecodable bytes raise
``OSError`` (or what PIL raises) when read, so ``RobustImageDataset`` substitutes (training) or
excludes (evaluation) them exactly as it does for files.

Class names: the labels are integers; when the paths are ``classname/file`` (``wnid/x.JPEG``)
and folders and labels match one to one over all labels, the folder names are the class names
(paths without a folder, such as a flat val map, do not vote); otherwise they are
``"0", "1", ...``.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from errors import UserError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
CACHE_MODES = ("no", "part", "full")
# The zip methods read here: stored (what prepare_imagenet writes) and deflate.
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature .. extra field length: 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
# Seconds between progress lines while a cache is filled.
_PROGRESS_EVERY_S = 30.0


def zip_path(root: str, split: str) -> str:
    return os.path.join(root, f"{split}.zip")


def map_path(root: str, split: str) -> str:
    return os.path.join(root, f"{split}_map.txt")


def check_zip_layout(root: str) -> None:
    """Raise a one-line ``UserError`` naming every file of the zip layout missing below ``root``."""
    missing = [
        os.path.basename(p)
        for split in SPLITS
        for p in (zip_path(root, split), map_path(root, split))
        if not os.path.isfile(p)
    ]
    if missing:
        raise UserError(
            f"--zip needs train.zip, val.zip, train_map.txt and val_map.txt in {root}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; write them with scripts/prepare_imagenet.py --zip, "
            f"or drop --zip to read train/ and val/ folders"
        )


# -----------------------------------------------------------------------------
# Map files
# -----------------------------------------------------------------------------
def _member_name(path: str) -> str:
    """A map path as a zip member name (the release writes some with a leading '/')."""
    while path.startswith("./"):
        path = path[2:]
    return path.lstrip("/")


def parse_map(path: str) -> list[tuple[str, int]]:
    """The ``(member, label)`` pairs of a map file, in file order; blank lines are skipped.

    A line is ``relative/path<TAB>label``; without a tab the label is the last whitespace-separated
    field. Raises ``UserError`` naming the file and line of the first malformed line.
    """
    samples: list[tuple[str, int]] = []
    with open(path, encoding="utf-8-sig") as f:
        for number, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
            label: int | None = None
            if len(parts) == 2 and parts[0].strip():
                try:
                    label = int(parts[1])
                except ValueError:
                    label = None
            if label is None or label < 0:
                raise UserError(
                    f"{path} line {number} is {line[:80]!r}; every line must be 'relative/path<TAB>label' "
                    f"with a label >= 0"
                )
            samples.append((_member_name(parts[0].strip()), label))
    if not samples:
        raise UserError(f"{path} lists no images; it needs one 'relative/path<TAB>label' line per image")
    return samples


def write_map(path: str, samples: Iterable[tuple[str, int]]) -> int:
    """Write ``relative/path<TAB>label`` lines atomically (temporary file, then rename); returns the count."""
    tmp = f"{path}.partial"
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for member, label in samples:
            if "\t" in member or "\n" in member:
                raise UserError(f"cannot write {member!r} to {path}: map paths may not hold tabs or newlines")
            f.write(f"{member}\t{int(label)}\n")
            n += 1
    os.replace(tmp, path)
    return n


def folder_members(split_dir: str, classes: Sequence[str]) -> list[tuple[str, str]]:
    """``(member, file path)`` of the images of ``split_dir/<class>/`` for ``classes``, in ImageFolder's order.

    Classes in the given order, files within a class as ``ImageFolder`` walks them (sorted, also in
    sub-folders), images recognised by torchvision's extensions; members use ``/``. A class folder
    that does not exist contributes nothing.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found: list[tuple[str, str]] = []
    for cls in classes:
        class_dir = os.path.join(split_dir, cls)
        if not os.path.isdir(class_dir):
            continue
        for folder, _, names in sorted(os.walk(class_dir, followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(IMG_EXTENSIONS):
                    path = os.path.join(folder, name)
                    found.append((os.path.relpath(path, split_dir).replace(os.sep, "/"), path))
    return found


def zip_is_complete(zip_file: str, members: Sequence[tuple[str, str]]) -> bool:
    """Whether ``zip_file`` holds exactly ``members`` (member, source file), with the sources' sizes,
    and was written after every source was last modified."""
    if not os.path.isfile(zip_file):
        return False
    try:
        written = os.stat(zip_file).st_mtime_ns
        with zipfile.ZipFile(zip_file) as zf:
            held = {i.filename: i.file_size for i in zf.infolist() if not i.filename.endswith("/")}
    except (zipfile.BadZipFile, OSError):
        return False
    if len(held) != len(members):
        return False
    for member, path in members:
        st = os.stat(path)
        if held.get(member) != st.st_size or st.st_mtime_ns > written:
            return False
    return True


def write_zip_split(split_dir: str, zip_file: str, map_file: str, class_to_idx: dict[str, int]) -> int:
    """Write ``split_dir``'s class folders as ``zip_file`` (``ZIP_STORED``) and ``map_file``.

    Members are ``<class>/<file>`` in ``ImageFolder``'s order, each labelled ``class_to_idx[class]``,
    so the zip dataset lists the same images in the same order with the same labels as the folder
    dataset. Skipped when both files exist and the zip already holds exactly these images (a rerun
    after a finished or interrupted one rewrites only what is incomplete). The zip is written to a
    temporary name and renamed, then the map. Returns the number of images.
    """
    classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
    members = folder_members(split_dir, classes)
    labels = [class_to_idx[m.split("/", 1)[0]] for m, _ in members]
    if os.path.isfile(map_file) and zip_is_complete(zip_file, members):
        try:
            done = parse_map(map_file) == [(m, label) for (m, _), label in zip(members, labels, strict=True)]
        except UserError:
            done = False
        if done:
            logger.info("%s is complete (%d images); skipped", zip_file, len(members))
            return len(members)
    tmp = f"{zip_file}.partial"
    started = last_report = time.perf_counter()
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for done_count, (member, path) in enumerate(members, 1):
            zf.write(path, arcname=member)
            if time.perf_counter() - last_report > _PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                logger.info("writing %s: %d of %d images", zip_file, done_count, len(members))
    os.replace(tmp, zip_file)
    write_map(map_file, ((m, label) for (m, _), label in zip(members, labels, strict=True)))
    logger.info("wrote %s and %s: %d images in %.1f s", zip_file, map_file, len(members), time.perf_counter() - started)
    return len(members)


def class_names(sample_lists: Sequence[Sequence[tuple[str, int]]]) -> tuple[list[str], bool]:
    """Class names indexed by label over all splits, and whether they are the folder names.

    Folder names are used when every label in ``0..max`` has exactly one folder and every folder
    one label among the ``folder/file`` paths; otherwise the names are ``str(label)``.
    """
    top = max(label for samples in sample_lists for _, label in samples)
    folder_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    consistent = True
    for samples in sample_lists:
        for member, label in samples:
            head, sep, _ = member.partition("/")
            if not sep or not head:
                continue
            if folder_of.setdefault(label, head) != head or label_of.setdefault(head, label) != label:
                consistent = False
                break
        if not consistent:
            break
    if consistent and len(folder_of) == top + 1:
        return [folder_of[i] for i in range(top + 1)], True
    return [str(i) for i in range(top + 1)], False


# -----------------------------------------------------------------------------
# Reading members
# -----------------------------------------------------------------------------
def _size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` (fewer only at the end of the file)."""
    if not hasattr(os, "pread"):  # pragma: no cover - not POSIX; one reader per process, so seek is safe
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def decode_rgb(data: bytes | memoryview) -> Image.Image:
    """Decode image bytes fully into RGB, as ``data.robust.load_rgb`` decodes a file.

    Raises what PIL raises for undecodable or truncated bytes (``OSError`` and subclasses,
    sometimes ``SyntaxError``/``ValueError``).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


class ZipImageDataset:
    """One split of the zip layout, with the attributes of torchvision's ``ImageFolder``.

    ``samples`` are ``(path, label)`` pairs in map order, ``path`` being ``<zip path>/<member>``
    so that logs and the evaluation summary name the archive and the member (``val.zip/n01/x.JPEG``);
    ``loader`` maps such a path to a decoded RGB image (cache first, then the zip). Also
    ``targets``, ``classes``, ``class_to_idx``, ``transform``, ``target_transform``, ``root``.
    ``__getitem__`` returns ``(transform(image), label)`` unguarded; ``RobustImageDataset`` adds
    the handling of unreadable images.

    ``classes`` default to ``class_names([samples])[0]``; ``build_zip_dataset`` passes the names
    of both splits so that train and val agree. ``cache_mode`` is one of ``CACHE_MODES``;
    ``rank``/``world_size`` choose the share ``part`` keeps. ``members``: the map's pairs when
    already parsed.
    """

    def __init__(
        self,
        zip_file: str,
        map_file: str,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        cache_mode: str = "no",
        rank: int = 0,
        world_size: int = 1,
        members: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        if cache_mode not in CACHE_MODES:
            raise UserError(f"DATA.CACHE_MODE is {cache_mode!r}; use one of {', '.join(CACHE_MODES)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.zip_file = zip_file
        self.map_file = map_file
        self.root = os.path.dirname(zip_file)
        self.transform = transform
        self.target_transform = target_transform
        self.cache_mode = cache_mode
        if members is None:
            members = parse_map(map_file)
        self.samples = [(os.path.join(zip_file, m), label) for m, label in members]
        self.targets = [label for _, label in members]
        self.classes = list(classes) if classes is not None else class_names([members])[0]
        if max(self.targets) >= len(self.classes):
            raise ValueError(f"{map_file} has label {max(self.targets)} but only {len(self.classes)} classes")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        # The first sample index of each path (what the loader is called with).
        self._index_of: dict[str, int] = {}
        for i, (path, _) in enumerate(self.samples):
            self._index_of.setdefault(path, i)
        self._index_members([m for m, _ in members])
        self._file: Any = None
        self._pid: int | None = None
        self._cache = np.empty(0, dtype=np.uint8)
        self._cache_start = np.full(len(members), -1, dtype=np.int64)
        if cache_mode != "no":
            self._fill_cache(rank, world_size)

    # ---- index -------------------------------------------------------------------------------
    def _index_members(self, members: list[str]) -> None:
        """Offsets, sizes, CRCs and methods of the listed members, from the central directory."""
        started = time.perf_counter()
        try:
            with zipfile.ZipFile(self.zip_file) as zf:
                infos = zf.NameToInfo
                n = len(members)
                self._offset = np.full(n, -1, dtype=np.int64)  # local header; -1: not in the zip
                self._csize = np.zeros(n, dtype=np.int64)
                self._size = np.zeros(n, dtype=np.int64)
                self._crc = np.zeros(n, dtype=np.uint32)
                self._method = np.zeros(n, dtype=np.uint8)
                missing: list[str] = []
                for i, member in enumerate(members):
                    info = infos.get(member)
                    if info is None:
                        missing.append(member)
                        continue
                    if info.flag_bits & 0x1:
                        raise UserError(
                            f"{member} in {self.zip_file} is encrypted; write the zip without a password "
                            f"(scripts/prepare_imagenet.py --zip)"
                        )
                    if info.compress_type not in _METHODS:
                        raise UserError(
                            f"{member} in {self.zip_file} uses zip compression method {info.compress_type}; "
                            f"store the images uncompressed (scripts/prepare_imagenet.py --zip writes ZIP_STORED)"
                        )
                    self._offset[i] = info.header_offset
                    self._csize[i] = info.compress_size
                    self._size[i] = info.file_size
                    self._crc[i] = info.CRC
                    self._method[i] = info.compress_type
                sample_names = [name for name in list(infos)[:3] if not name.endswith("/")]
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as e:
            raise UserError(
                f"{self.zip_file} is not a readable zip file ({e}); rewrite it with scripts/prepare_imagenet.py --zip"
            ) from e
        if len(missing) == len(members):
            raise UserError(
                f"none of the {len(members)} paths in {self.map_file} is a member of {self.zip_file} "
                f"(the map names e.g. {members[0]!r}, the zip holds e.g. {sample_names[:2]}); map paths must be "
                f"the member paths inside the zip"
            )
        if missing:
            logger.warning(
                "%d of the %d images in %s are not in %s (e.g. %s); they count as unreadable images",
                len(missing),
                len(members),
                self.map_file,
                self.zip_file,
                ", ".join(missing[:3]),
            )
        logger.debug("indexed %d members of %s in %.1f s", len(members), self.zip_file, time.perf_counter() - started)

    # ---- cache -------------------------------------------------------------------------------
    def _fill_cache(self, rank: int, world_size: int) -> None:
        """Copy the bytes of the cached share into one buffer, in zip order (sequential reads)."""
        started = time.perf_counter()
        n = len(self._offset)
        share = np.arange(n) if self.cache_mode == "full" else np.arange(rank, n, world_size)
        share = share[self._offset[share] >= 0]
        # Duplicate map entries of one member are read once, through the first index.
        first = np.array([self._index_of[self.samples[i][0]] == i for i in share], dtype=bool)
        share = share[first] if len(share) else share
        share = share[np.argsort(self._offset[share], kind="stable")]
        self._cache = np.empty(int(self._size[share].sum()), dtype=np.uint8)
        logger.info("caching %d images of %s (%s)", len(share), self.zip_file, _size_text(self._cache.nbytes))
        position, failed, last_report = 0, 0, started
        with open(self.zip_file, "rb", buffering=0) as f:
            for done, i in enumerate(share.tolist(), 1):
                try:
                    data = self._read_member(f.fileno(), i)
                except OSError as e:
                    failed += 1
                    logger.debug("not caching %s: %s", self.samples[i][0], e)
                    continue
                self._cache[position : position + len(data)] = np.frombuffer(data, dtype=np.uint8)
                self._cache_start[i] = position
                position += len(data)
                if time.perf_counter() - last_report > _PROGRESS_EVERY_S:
                    last_report = time.perf_counter()
                    logger.info("caching %s: %d of %d images", self.zip_file, done, len(share))
        what = "all images" if self.cache_mode == "full" else f"indices i % {world_size} == {rank}"
        logger.info(
            "cached %d images of %s (%s, cache mode %s): %s in memory, %.1f s%s",
            len(share) - failed,
            self.zip_file,
            what,
            self.cache_mode,
            _size_text(position),
            time.perf_counter() - started,
            f"; {failed} unreadable members left to the zip" if failed else "",
        )

    @property
    def cache_bytes(self) -> int:
        """Bytes of image data held in memory."""
        return int(self._cache.nbytes)

    @property
    def cached_count(self) -> int:
        return int((self._cache_start >= 0).sum())

    # ---- reading -------------------------------------------------------------------------------
    def _fd(self) -> int:
        """This process's descriptor of the zip, opened on first use (again after a fork)."""
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            # A forked worker inherits the parent's object; it opens its own and leaves that one be.
            self._file = open(self.zip_file, "rb", buffering=0)
            self._pid = pid
        return self._file.fileno()

    def _read_member(self, fd: int, i: int) -> bytes:
        """The uncompressed, CRC-checked bytes of sample ``i``'s member; ``OSError`` if unreadable."""
        offset = int(self._offset[i])
        member = self.samples[i][0]
        if offset < 0:
            raise FileNotFoundError(errno.ENOENT, f"not a member of {self.zip_file}", member)
        header = _pread_exact(fd, _LOCAL_HEADER.size, offset)
        if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
            raise OSError(f"{member}: no zip entry at offset {offset}; the zip is damaged or was changed")
        fields = _LOCAL_HEADER.unpack(header)
        start = offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        size = int(self._csize[i])
        data = _pread_exact(fd, size, start)
        if len(data) != size:
            raise OSError(f"{member}: the zip ends {size - len(data)} bytes into this member; the zip is truncated")
        if self._method[i] == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompress(data, -15)
            except zlib.error as e:
                raise OSError(f"{member}: corrupt deflate data ({e})") from e
        if zlib.crc32(data) != int(self._crc[i]) or len(data) != int(self._size[i]):
            raise OSError(f"{member}: CRC check failed; the zip member is corrupt")
        return data

    def read_bytes(self, index: int) -> bytes | memoryview:
        """The image file bytes of sample ``index``: from the cache when held, else from the zip."""
        start = int(self._cache_start[index])
        if start >= 0:
            return memoryview(self._cache)[start : start + int(self._size[index])]
        return self._read_member(self._fd(), index)

    def load(self, path: str) -> Image.Image:
        """The decoded RGB image of a sample path (the ``loader``)."""
        index = self._index_of.get(path)
        if index is None:
            raise FileNotFoundError(errno.ENOENT, f"not listed in {self.map_file}", path)
        return decode_rgb(self.read_bytes(index))

    @property
    def loader(self) -> Callable[[str], Image.Image]:
        return self.load

    def __getstate__(self) -> dict[str, Any]:
        # An open file never travels to another process; the receiver opens its own.
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        img = self.load(path)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def build_zip_dataset(
    root: str,
    is_train: bool,
    transform: Callable | None,
    cache_mode: str,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[ZipImageDataset, int]:
    """One split of the zip layout below ``root`` and the number of classes (max label + 1 over both maps).

    Validation reads ``part`` for any cache mode but ``no``: its sampler gives each rank exactly
    the indices ``part`` keeps, and a ``full`` copy of the other ranks' images would go unread.
    """
    if cache_mode not in CACHE_MODES:
        raise UserError(f"DATA.CACHE_MODE is {cache_mode!r}; use one of {', '.join(CACHE_MODES)}")
    check_zip_layout(root)
    # Both maps, so that train and val agree on the classes (ImageNet-1K's train map parses in ~1 s).
    maps = {split: parse_map(map_path(root, split)) for split in SPLITS}
    classes, from_folders = class_names([maps["train"], maps["val"]])
    train_labels = {label for _, label in maps["train"]}
    unseen = sorted({label for _, label in maps["val"]} - train_labels)
    if unseen:
        logger.warning(
            "%s has labels no training image has: %s", map_path(root, "val"), ", ".join(map(str, unseen[:5]))
        )
    split = "train" if is_train else "val"
    if not is_train and cache_mode == "full":
        cache_mode = "part"
    dataset = ZipImageDataset(
        zip_path(root, split),
        map_path(root, split),
        transform=transform,
        classes=classes,
        cache_mode=cache_mode,
        rank=rank,
        world_size=world_size,
        members=maps[split],
    )
    logger.debug("class names of %s: %s", root, "its folders" if from_folders else "the labels")
    return dataset, len(classes)
