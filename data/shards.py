"""Sharded tar datasets (the WebDataset convention): ``000000.tar``, ``000001.tar``, ... each holding
consecutive samples, the files of one sample sharing a key (``00000123.jpg`` + ``00000123.cls``).

Layout. A split is a list of shards (a folder of ``.tar`` files, a brace pattern such as
``/data/in1k/train-{000000..000146}.tar``, a glob, or one file) and, beside them, ``shards.json``:
the number of samples and bytes of each shard and the class names. ``scripts/make_shards.py``
writes both from an ImageFolder; without an up-to-date ``shards.json`` the samples are counted
once by reading the tar headers (logged). A sample is a run of consecutive members with the same
key (the member path up to the first dot of its file name); its image is the member with an image
extension (``jpg``, ``png``, ..., any case), its label the text of the ``cls`` member.

Reading. Members are stored uncompressed, so a sample is two ``os.pread`` calls at offsets read
from the tar headers. Each process (the main one and every loader worker, detected by a change of
pid) reads the headers of a shard the first time it reads from it (one 512-byte ``pread`` per
member, 5-9 µs here; ``tarfile`` reads tars with pax or long-name headers) and keeps the tables and
open files of the last ``MAX_OPEN_SHARDS`` shards. ``ShardDataset`` is
therefore a map-style dataset over the samples of the sorted shards (sample ``i`` is sample
``i - start[s]`` of shard ``s``), with the decoding and unreadable-image handling of
``data/robust.py``: an unreadable sample is replaced by the next readable one in training and comes
back as a placeholder (target -1) for ``engine.evaluate`` to exclude in evaluation, marked either
way in the dataset's ``ReplacementLog`` and named ``<shard>/<member>``.

Training order (``ShardStreamSampler``). Each epoch the shard list is permuted with (SEED, epoch)
and its samples concatenated in that order; rank ``r`` of ``w`` takes positions
``[r * n, (r + 1) * n)`` of that sequence (wrapping around at its end), ``n = ceil(E / w)`` with
``E = DATA.EPOCH_SAMPLES`` or, when 0, the number of samples. Every rank thus reads a contiguous
run of about ``shards / w`` shards (neighbouring ranks may split one shard between them, each
reading its own members), every sample is seen once per epoch when ``E`` is the sample count (the
last rank pads with ``< w`` samples from the start, as ``DistributedSampler`` does), and all ranks
take the same number of steps. The rank's run then passes through a shuffle buffer of
``DATA.SHUFFLE_BUFFER`` samples seeded by (SEED, epoch, rank): at any time the reads come from the
few shards that the buffer spans. The order is computed from the index alone (no reading), so it
does not depend on the number of loader workers (the DataLoader hands out its batches), and a run
resumed after ``k`` samples of an epoch skips exactly those ``k`` positions without reading them:
resume is exact at sample granularity. Augmentation is seeded per sample as for folders
(``data/sample_seeds.py``).

Evaluation uses ``ExactEvalSampler`` over the sorted shards: rank ``r`` scores the samples
``r, r + w, ...``, each exactly once, with no padding.

Why not the ``webdataset`` package: its pipeline streams shards inside each loader worker, so the
batches depend on the worker count and a mid-epoch resume replays or re-reads shards. Reading
members by offset gives worker-independent batches and exact resume with no new dependency; the
price is that shards must be local (or mounted) files, not ``pipe:``/HTTP streams.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from errors import UserError

from .robust import (
    MAX_REPLACEMENT_TRIES,
    UNREADABLE_ERRORS,
    EncodedImage,
    GuardedImageDataset,
    ReplacementLog,
    unreadable_reason,
)
from .samplers import ResumableSampler
from .zip_dataset import _pread_exact, decode_rgb, folder_members

logger = logging.getLogger(__name__)

INDEX_NAME = "shards.json"
INDEX_VERSION = 1
# Extensions (lower case) of the image member of a sample, as ImageFolder recognises them.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp"})
LABEL_EXTENSION = "cls"
# Shards whose header tables and open files each process keeps (least recently used go first).
MAX_OPEN_SHARDS = 8
# Seconds between progress lines while shards are counted or written.
_PROGRESS_EVERY_S = 30.0
_MASK64 = (1 << 64) - 1
# Purposes of the random streams of an epoch (part of their seeds).
_SHARD_ORDER, _BUFFER = 1, 2


# -----------------------------------------------------------------------------
# Shard lists
# -----------------------------------------------------------------------------
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..146}`` (zero-padded to the first bound's width) and ``{a,b,c}`` in ``pattern``.

    Several braces expand left to right (``{a,b}-{0..1}`` gives four names); nested braces are
    refused. Raises ``UserError`` for a malformed pattern.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise UserError(f"shard pattern {pattern!r} has a '}}' without '{{'; use e.g. train-{{000000..000146}}.tar")
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise UserError(f"shard pattern {pattern!r} has a '{{' without '}}'; use e.g. train-{{000000..000146}}.tar")
    body = pattern[start + 1 : end]
    if "{" in body:
        raise UserError(f"shard pattern {pattern!r} nests braces; use one level, e.g. train-{{000000..000146}}.tar")
    match = _RANGE.match(body)
    if match:
        first, last = match.groups()
        lo, hi = int(first), int(last)
        if hi < lo:
            raise UserError(f"shard pattern {pattern!r} counts down ({{{body}}}); write the lower bound first")
        items = [str(i).zfill(len(first)) for i in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise UserError(f"shard pattern {pattern!r} has {{{body}}}; use a range {{000000..000146}} or a list {{a,b}}")
    head, rests = pattern[:start], expand_braces(pattern[end + 1 :])
    return [head + item + rest for item in items for rest in rests]


def resolve_shards(spec: str, what: str) -> list[str]:
    """The sorted shard paths that ``spec`` names: a folder (its ``*.tar``), a brace pattern, a glob
    or one file. ``what`` names the setting in errors. Raises ``UserError`` when none or some are missing."""
    spec = os.path.expanduser(str(spec).strip())
    if not spec:
        raise UserError(f"{what} is empty; give a folder of .tar shards or a pattern such as /d/{{000000..000009}}.tar")
    if os.path.isdir(spec):
        with os.scandir(spec) as it:
            paths = [e.path for e in it if e.name.endswith(".tar") and not e.name.startswith(".") and e.is_file()]
        if not paths:
            raise UserError(f"{what}: {spec} holds no .tar shards; write them with scripts/make_shards.py")
        return sorted(paths)
    if any(c in spec for c in "*?["):
        paths = [p for p in glob.glob(spec) if os.path.isfile(p)]
        if not paths:
            raise UserError(f"{what}: {spec} matches no file; check the pattern")
        return sorted(paths)
    paths = expand_braces(spec)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(paths)} shards of {what} ({spec}) do not exist (e.g. {missing[0]}); "
            f"check the path and the brace range"
        )
    return sorted(set(paths))


# -----------------------------------------------------------------------------
# Tar headers
# -----------------------------------------------------------------------------
def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member by the WebDataset rule: the key is the path up to the first
    dot of the file name, the extension (lower case) the rest; None for a name without one."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class ShardTable:
    """Where the samples of one shard lie, from its tar headers.

    Per sample ``j``: ``names[j]`` (the image member, or the key when the sample has no image),
    ``image_offset``/``image_size`` (offset -1: no image member) and ``label_offset``/``label_size``
    (-1: no ``cls``). ``error`` says why the scan stopped before the end ("" when it did not):
    samples past ``len(names)`` are then unreadable.
    """

    names: list[str]
    image_offset: np.ndarray
    image_size: np.ndarray
    label_offset: np.ndarray
    label_size: np.ndarray
    error: str = ""

    def __len__(self) -> int:
        return len(self.names)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# Regular-file type flags of a tar header ('7': contiguous file, read as regular).
_REGULAR = (b"0", b"\0", b"7")
# Members without data: hard and symbolic links, devices, folders, FIFOs. Any other type (pax and
# GNU long-name headers, sparse files, ...) leaves the tar to tarfile.
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
_TRUNCATED = "the tar stops without its end-of-archive blocks; the shard is truncated"


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    return int(text, 8)


def members_by_headers(fd: int, file_size: int) -> tuple[list[tuple[str, int, int]], str] | None:
    """``(name, data offset, size)`` of the regular members and "" or why the scan stopped, reading
    one 512-byte header per member with ``os.pread``; None for anything but plain ustar/GNU headers
    (pax or long-name headers, base-256 sizes, a bad checksum), which ``tarfile`` then reads."""
    members: list[tuple[str, int, int]] = []
    pos = 0
    while True:
        block = os.pread(fd, _BLOCK, pos)
        if len(block) < _BLOCK:
            return members, _TRUNCATED
        if block == _ZERO_BLOCK:
            return members, ""
        flag = block[156:157]
        if (flag not in _REGULAR and flag not in _NO_DATA) or block[124] & 0x80 or block[257:262] != b"ustar":
            return None
        try:
            size = _octal(block[124:136])
            checksum = _octal(block[148:156])
        except ValueError:
            return None
        if checksum != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            return None
        if flag in _REGULAR:
            name = block[:100].split(b"\0", 1)[0]
            if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX: a prefix before the name
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            members.append((name.decode("utf-8", "surrogateescape"), pos + _BLOCK, size))
        else:
            size = 0
        pos += _BLOCK + -(-size // _BLOCK) * _BLOCK
        if pos > file_size:
            return members, _TRUNCATED


def members_by_tarfile(path: str) -> tuple[list[tuple[str, int, int]], str]:
    """What ``members_by_headers`` gives, through ``tarfile`` (any tar format it reads)."""
    members: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                info = tf.next()
                if info is None:
                    # A whole tar ends with zero blocks; one that stops at a member boundary was cut short.
                    return members, _TRUNCATED if tf.offset + _BLOCK > os.path.getsize(path) else ""
                if info.isreg():
                    members.append((info.name, info.offset_data, info.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        return members, unreadable_reason(e)


def scan_shard(path: str, fd: int | None = None) -> ShardTable:
    """Read the tar headers of ``path`` (seeking over the data) into a ``ShardTable``.

    Members that are not regular files, have no extension, or are neither an image nor a ``cls``
    are skipped; a damaged or truncated tar gives the samples found before the damage. ``fd``: an
    open descriptor of ``path`` to read through.
    """
    owned = fd is None
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    try:
        found = members_by_headers(fd, os.fstat(fd).st_size)
    finally:
        if owned:
            os.close(fd)
    members, error = found if found is not None else members_by_tarfile(path)
    names: list[str] = []
    columns: list[list[int]] = [[], [], [], []]  # image offset, image size, label offset, label size
    current: str | None = None
    for name, offset, size in members:
        split = split_member_name(name)
        if split is None:
            continue
        key, ext = split
        is_image = ext in IMAGE_EXTENSIONS
        if not is_image and ext != LABEL_EXTENSION:
            continue
        if key != current:
            current = key
            names.append(key)
            for col, value in zip(columns, (-1, 0, -1, 0), strict=True):
                col.append(value)
        if is_image and columns[0][-1] < 0:
            names[-1] = name
            columns[0][-1], columns[1][-1] = offset, size
        elif not is_image and columns[2][-1] < 0:
            columns[2][-1], columns[3][-1] = offset, size
    arrays = [np.asarray(c, dtype=np.int64) for c in columns]
    return ShardTable(names, *arrays, error=error)


def _read_label(fd: int, offset: int, size: int, where: str) -> int:
    if offset < 0:
        raise FileNotFoundError(errno.ENOENT, "the sample has no .cls member", where)
    raw = _pread_exact(fd, size, offset)
    if len(raw) != size:
        raise OSError(f"{where}: the shard ends inside the .cls member; the shard is truncated")
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise OSError(f"{where}: the .cls member holds {raw[:20]!r}, not a class index") from e
    if label < 0:
        raise OSError(f"{where}: negative class index {label} in its .cls member")
    return label


def count_shard(path: str) -> tuple[int, int]:
    """``(samples, largest label)`` of one shard by reading its headers and ``cls`` members
    (largest label -1 when none could be read)."""
    table = scan_shard(path)
    top = -1
    with open(path, "rb", buffering=0) as f:
        for j in range(len(table)):
            try:
                top = max(top, _read_label(f.fileno(), int(table.label_offset[j]), int(table.label_size[j]), path))
            except OSError:
                continue
    if table.error:
        logger.warning(
            "%s is damaged or truncated after %d samples (%s); the rest of it is not counted",
            path,
            len(table),
            table.error,
        )
    return len(table), top


# -----------------------------------------------------------------------------
# The index (shards.json)
# -----------------------------------------------------------------------------
@dataclass
class ShardIndex:
    """The shards of one split in order, their sample counts and what ``shards.json`` says of classes.

    ``classes`` is None when no ``shards.json`` beside the shards names them; ``max_label`` is
    the largest label a counting scan read (-1 when nothing was scanned).
    """

    paths: list[str]
    counts: list[int]
    classes: list[str] | None
    max_label: int = -1

    @property
    def total(self) -> int:
        return sum(self.counts)


def index_path(folder: str) -> str:
    return os.path.join(folder, INDEX_NAME)


def read_index_file(path: str) -> dict[str, Any] | None:
    """The parsed ``shards.json`` at ``path`` (None when absent); ``UserError`` when malformed."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        shards = data["shards"]
        if not isinstance(shards, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("samples"), int) and isinstance(v.get("bytes"), int)
            for v in shards.values()
        ):
            raise ValueError("'shards' must map names to {samples, bytes}")
        classes = data.get("classes")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError("'classes' must be a list of names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path} is not a shard index ({detail}); delete it to count the shards again, "
            f"or rewrite it with scripts/make_shards.py --index"
        ) from e
    return data


def write_index_file(
    folder: str, entries: dict[str, tuple[int, int]], classes: Sequence[str] | None, **extra: Any
) -> str:
    """Write ``folder/shards.json`` atomically: ``entries`` maps shard file names to (samples, bytes)."""
    data: dict[str, Any] = {
        "version": INDEX_VERSION,
        "samples": sum(n for n, _ in entries.values()),
        "classes": list(classes) if classes is not None else None,
        "shards": {name: {"samples": n, "bytes": size} for name, (n, size) in sorted(entries.items())},
        **extra,
    }
    path = index_path(folder)
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


# Indexes already loaded by this process, keyed by the shards' and sidecars' (path, size, mtime).
_INDEX_CACHE: OrderedDict[tuple, ShardIndex] = OrderedDict()


def _stat_key(paths: Iterable[str]) -> tuple:
    key = []
    for p in paths:
        try:
            st = os.stat(p)
            key.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            key.append((p, -1, -1))
    return tuple(key)


def load_index(paths: Sequence[str], what: str) -> ShardIndex:
    """Sample counts of ``paths`` from the ``shards.json`` beside them, counting (and logging) the
    shards it lacks or whose size changed since it was written. The classes are those of the
    sidecars (which must agree); ``what`` names the split in messages."""
    folders = sorted({os.path.dirname(p) for p in paths})
    key = (_stat_key(paths), _stat_key(index_path(d) for d in folders))
    if key in _INDEX_CACHE:
        _INDEX_CACHE.move_to_end(key)
        return _INDEX_CACHE[key]
    sidecars = {d: read_index_file(index_path(d)) for d in folders}
    counts: list[int] = []
    to_count: list[int] = []
    for i, p in enumerate(paths):
        sidecar = sidecars[os.path.dirname(p)]
        entry = sidecar["shards"].get(os.path.basename(p)) if sidecar else None
        if entry is not None and entry["bytes"] == os.path.getsize(p):
            counts.append(int(entry["samples"]))
        else:
            counts.append(0)
            to_count.append(i)
    max_label = -1
    if to_count:
        started = last = time.perf_counter()
        logger.info(
            "%s: counting the samples of %d of %d shards by reading their tar headers (no up-to-date %s beside "
            "them; `python scripts/make_shards.py --index %s` writes one)",
            what,
            len(to_count),
            len(paths),
            INDEX_NAME,
            os.path.dirname(paths[to_count[0]]),
        )
        for done, i in enumerate(to_count, 1):
            counts[i], top = count_shard(paths[i])
            max_label = max(max_label, top)
            if time.perf_counter() - last > _PROGRESS_EVERY_S:
                last = time.perf_counter()
                logger.info("%s: counted %d of %d shards", what, done, len(to_count))
        logger.info(
            "%s: counted %d samples in %d shards in %.1f s",
            what,
            sum(counts[i] for i in to_count),
            len(to_count),
            time.perf_counter() - started,
        )
    named = {d: s["classes"] for d, s in sidecars.items() if s is not None and s.get("classes") is not None}
    distinct = {tuple(c) for c in named.values()}
    if len(distinct) > 1:
        raise UserError(
            f"the {INDEX_NAME} files of {what} name different classes ({', '.join(named)}); "
            f"write all its shards from one class list"
        )
    classes = list(next(iter(distinct))) if distinct else None
    index = ShardIndex(list(paths), counts, classes, max_label)
    _INDEX_CACHE[key] = index
    while len(_INDEX_CACHE) > 4:
        _INDEX_CACHE.popitem(last=False)
    return index


# -----------------------------------------------------------------------------
# The dataset
# -----------------------------------------------------------------------------
class ShardDataset(GuardedImageDataset):
    """The samples of a list of shards as one map-style dataset: item ``i`` is sample
    ``i - starts[s]`` of shard ``s``.

    ``dataset[key]`` is ``(image, target)`` as from ``RobustImageDataset``: ``key`` an index or
    ``(index, seed)`` (the transform then runs under ``seeded_rngs(seed)``); an unreadable sample
    (undecodable image, missing or bad ``cls``, a label >= ``num_classes``, a truncated or damaged
    shard) is marked in ``replacements`` (named by ``sample_name``: ``<shard path>/<member>``) and
    replaced by the next readable sample when ``substitute`` (training) or returned as a black
    placeholder with target -1 for the caller to exclude; ``strict`` raises ``UnreadableImageError``.
    """

    fix_hint = "rewrite the shard"
    check_hint = "check the shards and the disk"

    def __init__(
        self,
        index: ShardIndex,
        classes: Sequence[str],
        num_classes: int,
        transform: Callable | None = None,
        strict: bool = False,
        substitute: bool = True,
        max_tries: int = MAX_REPLACEMENT_TRIES,
    ) -> None:
        self.shards = list(index.paths)
        self.counts = np.asarray(index.counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = int(num_classes)
        self.transform = transform
        self.target_transform = None
        self.strict = strict
        self.substitute = substitute
        self.max_tries = max_tries
        self.root = os.path.dirname(self.shards[0]) if self.shards else ""
        self.replacements = ReplacementLog(int(self.counts.sum()))
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._tables: OrderedDict[int, tuple[ShardTable, int]] = OrderedDict()
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Open files never travel to another process; the receiver scans and opens its own.
        state = dict(self.__dict__)
        state["_tables"] = OrderedDict()
        state["_pid"] = None
        return state

    def close(self) -> None:
        """Close this process's open shard files."""
        if self._pid == os.getpid():
            for _, fd in self._tables.values():
                os.close(fd)
        self._reset_handles()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to do
            pass

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shard_counts(self) -> list[int]:
        return self.counts.tolist()

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, sample within the shard)`` of dataset index ``index``."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def _table(self, shard: int) -> tuple[ShardTable, int]:
        """The header table and open descriptor of ``shard`` in this process (scanned on first use)."""
        pid = os.getpid()
        if self._pid != pid:
            # A forked worker inherits the parent's descriptors; it leaves them be and opens its own.
            self._tables = OrderedDict()
            self._pid = pid
        held = self._tables.get(shard)
        if held is not None:
            self._tables.move_to_end(shard)
            return held
        path = self.shards[shard]
        fd = os.open(path, os.O_RDONLY)
        table = scan_shard(path, fd)
        if len(table) != self.counts[shard]:
            logger.warning(
                "%s holds %d samples but its index says %d%s; rewrite the shard or its %s",
                path,
                len(table),
                int(self.counts[shard]),
                f" ({table.error})" if table.error else "",
                INDEX_NAME,
            )
        self._tables[shard] = (table, fd)
        while len(self._tables) > MAX_OPEN_SHARDS:
            _, (_, old) = self._tables.popitem(last=False)
            os.close(old)
        return table, fd

    def sample_name(self, index: int) -> str:
        """``<shard path>/<image member>`` of sample ``index`` (``#<n>`` past the shard's readable end)."""
        shard, j = self.locate(index)
        table, _ = self._table(shard)
        return f"{self.shards[shard]}/{table.names[j]}" if j < len(table) else f"{self.shards[shard]}#{j}"

    def read_sample(self, index: int) -> tuple[bytes, int]:
        """The image bytes and label of sample ``index``; ``OSError`` when the shard cannot give them."""
        shard, j = self.locate(index)
        table, fd = self._table(shard)
        path = self.shards[shard]
        if j >= len(table):
            why = table.error or "the shard holds fewer samples than its index says"
            raise OSError(f"{path}: no sample {j} ({why})")
        where = f"{path}/{table.names[j]}"
        label = _read_label(fd, int(table.label_offset[j]), int(table.label_size[j]), where)
        if label >= self.num_classes:
            raise OSError(f"{where}: class index {label} but the model has {self.num_classes} classes")
        offset, size = int(table.image_offset[j]), int(table.image_size[j])
        if offset < 0:
            raise FileNotFoundError(errno.ENOENT, "the sample has no image member", where)
        data = _pread_exact(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{where}: the shard ends {size - len(data)} bytes into this member; it is truncated")
        return data, label

    def _try_load(self, index: int, seed: int | None = None) -> tuple[Any, int, str]:
        """The decoded image and label of ``index``, or None, the label if known (else -1), and why.

        With a transform that has a decode stage (the fast training pipeline), the bytes go to
        ``transform.decode_encoded(EncodedImage, seed)`` instead, inside the same guard: a JPEG is
        decoded at reduced size when the sample's crop allows it, as from folders and zips.
        """
        label = -1
        try:
            data, label = self.read_sample(index)
            decode = getattr(self.transform, "decode_encoded", None)
            if decode is None:
                return decode_rgb(data), label, ""
            return decode(EncodedImage(data, self.sample_name(index)), seed), label, ""
        except UNREADABLE_ERRORS as e:
            return None, label, unreadable_reason(e)


# -----------------------------------------------------------------------------
# Training order
# -----------------------------------------------------------------------------
def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([w & _MASK64 for w in words])


def buffer_shuffle(items: Sequence[int] | np.ndarray, size: int, rng: np.random.Generator) -> list[int]:
    """``items`` through a shuffle buffer of ``size``: fill it with the first ``size`` items, then
    for each further item emit a random buffered one and put the item in its place; at the end
    emit the rest of the buffer in random order. ``size`` <= 1 keeps the order."""
    items = items.tolist() if isinstance(items, np.ndarray) else [int(i) for i in items]
    size = min(int(size), len(items))
    if size <= 1:
        return items
    buffer = items[:size]
    out: list[int] = []
    picks = rng.integers(0, size, len(items) - size).tolist()
    for item, slot in zip(items[size:], picks, strict=True):
        out.append(buffer[slot])
        buffer[slot] = item
    out.extend(buffer[i] for i in rng.permutation(size).tolist())
    return out


class ShardStreamSampler(ResumableSampler):
    """The training order over shards: whole shards in a per-epoch order, split across ranks by
    position, then a shuffle buffer (see the module docstring).

    A ``ResumableSampler`` with another ``epoch_indices``: ``set_epoch``, ``set_start_index``,
    ``len`` and the ``(index, seed)`` items (seed ``sample_seed(SEED, epoch, i * world + rank)``)
    behave as there. ``counts`` are the samples per shard in dataset order; every rank yields
    ``num_samples = ceil(E / num_replicas)`` items per epoch, ``E = epoch_samples`` or (0) the total.
    """

    def __init__(
        self,
        counts: Sequence[int],
        num_replicas: int,
        rank: int,
        seed: int = 0,
        shuffle_buffer: int = 2000,
        epoch_samples: int = 0,
    ) -> None:
        counts = [int(c) for c in counts]
        total = sum(counts)
        if epoch_samples < 0:
            raise UserError(f"DATA.EPOCH_SAMPLES is {epoch_samples}; use 0 (every sample once) or a positive count")
        if shuffle_buffer < 0:
            raise UserError(f"DATA.SHUFFLE_BUFFER is {shuffle_buffer}; use 0 (no buffer) or a positive size")
        super().__init__(
            epoch_samples or total, num_replicas, rank, shuffle=True, seed=seed, drop_last=False, sample_seeds=True
        )
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.total = total
        self.shuffle_buffer = int(shuffle_buffer)

    def shard_order(self) -> list[int]:
        """The shards in this epoch's order (the same on every rank)."""
        return _rng(self.seed, self.epoch, _SHARD_ORDER).permutation(len(self.counts)).tolist()

    def rank_run(self) -> np.ndarray:
        """This rank's samples of the epoch before the shuffle buffer: its positions of the shards'
        concatenation in ``shard_order()``, wrapping around at the end."""
        if self.total == 0:
            return np.zeros(0, dtype=np.int64)
        order = self.shard_order()
        sequence = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in order])
        first = self.rank * self.num_samples
        return sequence[np.arange(first, first + self.num_samples) % self.total]

    def epoch_indices(self) -> list[int]:
        """This rank's full order for the current epoch, ignoring any skip."""
        return buffer_shuffle(self.rank_run(), self.shuffle_buffer, _rng(self.seed, self.epoch, _BUFFER, self.rank))


# -----------------------------------------------------------------------------
# From the config
# -----------------------------------------------------------------------------
def shard_specs(config: Any) -> dict[str, tuple[str, str]]:
    """``split -> (spec, setting name)`` for train and val: DATA.SHARDS_* or DATA_PATH/<split>."""
    root = str(config.DATA.DATA_PATH or "")
    specs: dict[str, tuple[str, str]] = {}
    for split, given in (("train", config.DATA.SHARDS_TRAIN), ("val", config.DATA.SHARDS_VAL)):
        key = f"DATA.SHARDS_{split.upper()}"
        if given:
            specs[split] = (str(given), key)
        elif root:
            specs[split] = (os.path.join(root, split), f"{key} (default DATA_PATH/{split})")
        else:
            raise UserError(
                f"DATA.FORMAT shards needs {key} or a --data-path holding {split}/ with .tar shards; "
                f"write them with scripts/make_shards.py"
            )
    return specs


def build_shard_dataset(
    config: Any, is_train: bool, transform: Callable | None, substitute: bool, num_classes_cap: int | None = None
) -> tuple[ShardDataset, int]:
    """One split's ``ShardDataset`` and the number of classes.

    The classes are those the ``shards.json`` files name (train and val must agree), else
    ``"0" .. str(largest label)`` from counting both splits. ``num_classes_cap`` (ImageNet-22K)
    fixes the number of model outputs instead.
    """
    specs = shard_specs(config)
    indexes = {split: load_index(resolve_shards(spec, what), what) for split, (spec, what) in specs.items()}
    named = {split: ix.classes for split, ix in indexes.items() if ix.classes is not None}
    if len(named) == 2 and named["train"] != named["val"]:
        raise UserError(
            f"the train and val shards name different classes ({len(named['train'])} and {len(named['val'])}) "
            f"in their {INDEX_NAME}; write both splits with one scripts/make_shards.py run"
        )
    if named:
        classes = next(iter(named.values()))
    else:
        top = max(ix.max_label for ix in indexes.values())
        if top < 0:
            raise UserError(
                "no sample of the shards has a readable .cls label; each sample needs <key>.cls holding its "
                "class index (scripts/make_shards.py writes them)"
            )
        classes = [str(i) for i in range(top + 1)]
    num_classes = len(classes)
    if num_classes_cap is not None:
        if num_classes > num_classes_cap:
            raise UserError(
                f"the shards have {num_classes} classes but DATA.DATASET imagenet22K has {num_classes_cap}; "
                f"use DATA.DATASET imagenet"
            )
        num_classes = num_classes_cap
    split = "train" if is_train else "val"
    index = indexes[split]
    if index.total == 0:
        raise UserError(f"the {split} shards ({index.paths[0]}, ...) hold no samples; check them or rebuild them")
    dataset = ShardDataset(
        index,
        classes,
        num_classes,
        transform=transform,
        strict=bool(config.DATA.STRICT),
        substitute=substitute,
    )
    logger.info(
        "%s set: %d images in %d shards, %d classes, from %s",
        split,
        len(dataset),
        len(index.paths),
        num_classes,
        os.path.dirname(index.paths[0]),
    )
    return dataset, num_classes


def build_shard_sampler(config: Any, dataset: ShardDataset, world_size: int, rank: int) -> ShardStreamSampler:
    return ShardStreamSampler(
        dataset.shard_counts,
        world_size,
        rank,
        seed=int(config.SEED),
        shuffle_buffer=int(config.DATA.SHUFFLE_BUFFER),
        epoch_samples=int(config.DATA.EPOCH_SAMPLES),
    )


# -----------------------------------------------------------------------------
# Writing shards (scripts/make_shards.py)
# -----------------------------------------------------------------------------
def split_classes(root: str) -> list[str]:
    """The class folders of ``root/train`` (``root/val`` must hold the same, when present), sorted."""
    found: dict[str, list[str]] = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            with os.scandir(folder) as it:
                found[split] = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not found.get("train"):
        raise UserError(f"{root}/train holds no class folders; --data-path must hold train/<class>/ (and val/<class>/)")
    if "val" in found and found["val"] != found["train"]:
        only = sorted(set(found["train"]) ^ set(found["val"]))
        raise UserError(
            f"train/ and val/ of {root} have different class folders (e.g. {', '.join(only[:3])}); "
            f"give both splits the same class folders"
        )
    return found["train"]


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header that depends on name and size only (so the same input writes the same bytes)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _member_bytes(size: int) -> int:
    """Bytes one member takes in a tar: a 512-byte header and the data padded to 512."""
    return 512 + -(-size // 512) * 512


def clear_shard_folder(folder: str, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` delete) the shards and index a folder already holds."""
    if not os.path.isdir(folder):
        return
    old = [n for n in os.listdir(folder) if n.endswith((".tar", ".tar.partial")) or n.startswith(INDEX_NAME)]
    if old and not overwrite:
        raise UserError(f"{folder} already holds shards ({len(old)} files); pass --overwrite or choose another --out")
    for name in old:
        os.remove(os.path.join(folder, name))


def write_split_shards(
    split_dir: str,
    out_dir: str,
    classes: Sequence[str],
    shuffle_seed: int | None,
    shard_size: int = 0,
    max_bytes: int = 0,
) -> dict[str, tuple[int, int]]:
    """Write the images of ``split_dir/<class>/`` as ``out_dir/000000.tar, ...`` and ``shards.json``.

    Images are taken in ImageFolder's order (``i`` = their index there); with ``shuffle_seed`` that
    order is permuted with it (training: each shard mixes classes), else kept (validation). Sample
    ``i`` is ``{i:08d}.<original extension>`` (the file's bytes) and ``{i:08d}.cls`` (its class
    index). A shard closes after ``shard_size`` samples or before it would pass ``max_bytes``
    (0: no limit; a single larger sample still gets a shard). Shards are written under a temporary
    name and renamed, the index last. Returns ``{shard name: (samples, bytes)}``.
    """
    members = folder_members(split_dir, classes)
    if not members:
        raise UserError(f"{split_dir} holds no images in its class folders")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    labels = [class_to_idx[m.split("/", 1)[0]] for m, _ in members]
    order = list(range(len(members)))
    if shuffle_seed is not None:
        order = _rng(shuffle_seed).permutation(len(members)).tolist()
    width = max(8, len(str(len(members) - 1)))
    os.makedirs(out_dir, exist_ok=True)
    entries: dict[str, tuple[int, int]] = {}
    started = last = time.perf_counter()
    tf: tarfile.TarFile | None = None
    name = tmp = ""
    count = size = 0

    def close() -> None:
        nonlocal tf
        if tf is None:
            return
        tf.close()
        os.replace(tmp, os.path.join(out_dir, name))
        entries[name] = (count, os.path.getsize(os.path.join(out_dir, name)))
        tf = None

    for done, i in enumerate(order, 1):
        path = members[i][1]
        with open(path, "rb") as f:
            data = f.read()
        label = str(labels[i]).encode("ascii")
        ext = os.path.splitext(path)[1].lstrip(".") or "jpg"
        need = _member_bytes(len(data)) + _member_bytes(len(label))
        full = tf is not None and (
            (shard_size and count >= shard_size) or (max_bytes and count and size + need > max_bytes)
        )
        if full:
            close()
        if tf is None:
            name = f"{len(entries):06d}.tar"
            tmp = os.path.join(out_dir, f"{name}.partial")
            tf = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            count = size = 0
        key = f"{i:0{width}d}"
        for member, payload in ((f"{key}.{ext}", data), (f"{key}.{LABEL_EXTENSION}", label)):
            tf.addfile(_tar_info(member, len(payload)), io.BytesIO(payload))
        count += 1
        size += need
        if time.perf_counter() - last > _PROGRESS_EVERY_S:
            last = time.perf_counter()
            logger.info("writing %s: %d of %d images", out_dir, done, len(members))
    close()
    write_index_file(
        out_dir,
        entries,
        classes,
        source=os.path.abspath(split_dir),
        shuffled_with_seed=shuffle_seed,
    )
    logger.info(
        "wrote %d images to %d shards in %s in %.1f s",
        len(members),
        len(entries),
        out_dir,
        time.perf_counter() - started,
    )
    return entries


def index_existing_shards(folder: str, classes: Sequence[str] | None = None) -> str:
    """Count the shards of ``folder`` and write its ``shards.json`` (class names: ``classes``, those of
    an existing index, or ``"0" .. str(largest label)``). Returns the index path."""
    paths = resolve_shards(folder, "--index")
    previous = read_index_file(index_path(folder)) if os.path.isfile(index_path(folder)) else None
    entries: dict[str, tuple[int, int]] = {}
    top = -1
    for p in paths:
        n, label = count_shard(p)
        entries[os.path.basename(p)] = (n, os.path.getsize(p))
        top = max(top, label)
    if classes is None and previous is not None and previous.get("classes") is not None:
        classes = previous["classes"]
    if classes is None:
        classes = [str(i) for i in range(top + 1)]
    elif top >= len(classes):
        raise UserError(f"{folder} has class index {top} but only {len(classes)} class names are given")
    path = write_index_file(folder, entries, classes)
    logger.info("wrote %s: %d samples in %d shards", path, sum(n for n, _ in entries.values()), len(entries))
    return path
