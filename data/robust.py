"""Reading images so that a broken file never becomes silent noise.

``load_rgb`` fully decodes a file (truncated files raise); ``load_encoded`` only reads and
identifies it, for a transform that decodes it itself (``data.fast_transforms``: at reduced size
when its crop allows). ``RobustImageDataset`` wraps an image dataset and, for a sample whose file
cannot be read, either replaces it by the next readable one (training: the batch keeps its size)
or returns a blank placeholder to be dropped (evaluation: metrics must be over the files named,
never over a stand-in, whose target is -1); either way it marks the sample in its
``ReplacementLog``, from which the loop counts and names the unreadable files after the
pass. With ``strict`` it raises ``UnreadableImageError`` (a ``UserError``) instead.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from errors import UserError

from .sample_seeds import seeded_rngs

logger = logging.getLogger(__name__)

# How many following samples are tried before giving up on a run of unreadable files.
MAX_REPLACEMENT_TRIES = 10

# The target of a placeholder row (evaluation): no class, so ``CrossEntropyLoss(ignore_index=-1)``
# and the top-k counts leave it out without a host-side mask.
UNREADABLE_TARGET = -1

# Side of the black placeholder returned for an unreadable file when not substituting; the
# transform resizes it like any image, so it batches with the real ones (and is never scored).
PLACEHOLDER_SIDE = 32

# What PIL raises for a missing, unidentifiable, truncated or corrupt file; anything else is a bug.
UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)

# Marks our one-line message inside the multi-line text DataLoader workers re-raise with.
_MESSAGE_MARK = "unreadable image "


class UnreadableImageError(UserError):
    """An image file that cannot be decoded (raised with ``DATA.STRICT`` or when no replacement works).

    DataLoader workers re-raise an exception as ``type(e)(traceback_text)``; the constructor
    recovers the original one-line message from that text so the user still sees one line.
    """

    def __init__(self, message: str) -> None:
        if "\n" in message:
            lines = [line for line in message.splitlines() if _MESSAGE_MARK in line]
            if lines:
                message = lines[-1][lines[-1].index(_MESSAGE_MARK) :]
        super().__init__(message)


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` and decode all of it into an RGB image.

    Raises whatever PIL raises for an unreadable file (``OSError`` and subclasses for missing,
    unidentifiable or truncated files, sometimes ``SyntaxError``/``ValueError`` for corrupt data).
    """
    # Some libraries flip this global on; truncated files must fail here, not decode as grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with open(path, "rb") as f:
        img = Image.open(f)
        # convert() forces the full decode while the file is still open.
        return img.convert("RGB")


class EncodedImage:
    """An image file read into memory and identified (format, size and mode from its header), not decoded.

    ``open()`` gives a PIL image of the bytes whose pixels are decoded on ``load()``, so a caller
    may ``draft`` it first (JPEG: decode at 1/2, 1/4 or 1/8 scale); ``decode()`` is what
    ``load_rgb`` returns. Creating one raises what ``load_rgb`` raises for a missing or
    unidentifiable file; decoding raises for a truncated or corrupt one.
    """

    __slots__ = ("_opened", "data", "format", "mode", "size", "source")

    def __init__(self, data: bytes | memoryview, source: str = "") -> None:
        self.data = data
        self.source = source
        self._opened: Image.Image | None = Image.open(io.BytesIO(data))
        self.format = self._opened.format
        self.mode = self._opened.mode
        self.size = self._opened.size

    def open(self) -> Image.Image:
        """A PIL image of the bytes, not yet decoded (the one opened to identify them, then fresh ones)."""
        img, self._opened = self._opened, None
        return img if img is not None else Image.open(io.BytesIO(self.data))

    def decode(self) -> Image.Image:
        """All of the image as RGB, as ``load_rgb`` decodes the file (truncated data raises)."""
        return decode_opened(self.open())


def decode_opened(img: Image.Image) -> Image.Image:
    """Decode an opened (possibly drafted) PIL image into RGB; truncated data raises ``OSError``."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    img.load()
    # An RGB image is used as decoded; load_rgb's convert() would only copy it.
    return img if img.mode == "RGB" else img.convert("RGB")


def load_encoded(path: str) -> EncodedImage:
    """Read and identify ``path`` without decoding it; raises as ``load_rgb`` does for a missing or
    unidentifiable file."""
    with open(path, "rb") as f:
        return EncodedImage(f.read(), path)


class ReplacementLog:
    """Which samples of a dataset could not be read, kept where every loader worker can mark it.

    One flag per sample index in a shared-memory tensor (one byte per sample): the worker that
    meets an unreadable sample sets its flag, and the loop reads the count and the names once,
    after the pass (``clear`` before it), instead of a path travelling with every row of every
    batch. Worker processes inherit the memory (fork) or receive it through torch's sharing.
    """

    def __init__(self, n: int) -> None:
        self.flags = torch.zeros(n, dtype=torch.bool).share_memory_()

    def mark(self, index: int) -> None:
        self.flags[index] = True

    def clear(self) -> None:
        self.flags.zero_()

    def indices(self) -> list[int]:
        return self.flags.nonzero().flatten().tolist()


def unreadable_names(dataset: Any) -> list[str]:
    """Names of the samples of ``dataset`` marked unreadable since its log was last cleared
    (none for a dataset without a ``ReplacementLog``)."""
    log = getattr(dataset, "replacements", None)
    return [dataset.sample_name(i) for i in log.indices()] if log is not None else []


def clear_unreadable(dataset: Any) -> None:
    """Start a pass: forget the samples marked so far (no-op for a dataset without a log)."""
    log = getattr(dataset, "replacements", None)
    if log is not None:
        log.clear()


def load_rgb_or_user_error(path: str) -> Image.Image:
    """:func:`load_rgb` for a file a user named on the command line: one ``UserError`` line
    naming it when it is missing or cannot be decoded."""
    try:
        return load_rgb(path)
    except UNREADABLE_ERRORS as e:
        raise UserError(f"cannot read image {path} ({unreadable_reason(e)}); pass an image file") from None


def unreadable_reason(exc: BaseException) -> str:
    """``exc`` as one short line, ``"<Type>: <first line of the message>"``, for naming a bad file."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GuardedImageDataset(Dataset):
    """The unreadable-sample policy every image dataset here shares; ``__getitem__`` returns
    ``(image, target)`` for a key ``index`` or ``(index, seed)``.

    A subclass provides ``_try_load(index, seed) -> (image or None, target, reason)``,
    ``sample_name(index)``, ``transform``, ``target_transform`` and the attributes ``strict``,
    ``substitute``, ``max_tries`` and ``replacements`` (a :class:`ReplacementLog`). An unreadable
    sample is marked in the log, then: ``strict`` raises ``UnreadableImageError``; ``substitute``
    (training) takes the next readable sample (up to ``max_tries``, wrapping around); otherwise
    (evaluation) a black placeholder with target ``UNREADABLE_TARGET``. With a seed the transform
    runs under ``seeded_rngs(seed)``: its randomness depends on the seed alone.
    """

    # What the strict error tells the user to do, and where a run of failures says to look.
    fix_hint = "delete or replace the file"
    check_hint = "check the dataset files and the disk"

    def _try_load(self, index: int, seed: int | None) -> tuple[Any, int, str]:
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        img, target, reason = self._try_load(index, seed)
        if img is None:
            name = self.sample_name(index)
            self.replacements.mark(index)
            if self.strict:
                raise UnreadableImageError(
                    f"{_MESSAGE_MARK}{name} ({reason}); {self.fix_hint}, "
                    f"or set DATA.STRICT False to {'train on' if self.substitute else 'evaluate'} without it"
                )
            if self.substitute:
                logger.debug("unreadable sample %s (%s); substituting the next sample", name, reason)
                img, target = self._next_readable(index, seed, name, reason)
            else:
                logger.debug("unreadable sample %s (%s); returning a placeholder to be excluded", name, reason)
                img, target = Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE)), UNREADABLE_TARGET
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with seeded_rngs(seed):
                    img = self.transform(img)
        if target != UNREADABLE_TARGET and self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def _next_readable(self, index: int, seed: int | None, name: str, reason: str) -> tuple[Any, int]:
        tries = min(self.max_tries, len(self) - 1)
        for step in range(1, tries + 1):
            img, target, _ = self._try_load((index + step) % len(self), seed)
            if img is not None:
                return img, target
        raise UnreadableImageError(
            f"{_MESSAGE_MARK}{name} ({reason}) and the {tries} samples after it are all unreadable; {self.check_hint}"
        )


class RobustImageDataset(GuardedImageDataset):
    """Wraps a dataset of image files; ``__getitem__`` returns ``(image, target)``.

    ``base`` must provide ``samples`` (a sequence of ``(path, class_index)``), ``loader``
    (path -> image), ``transform`` and ``target_transform`` (callables or None) and ``classes``
    (class names indexed by target), as torchvision's ``ImageFolder`` does.

    ``image`` is ``transform(loader(path))``; ``target`` is the int class index (after
    ``target_transform``). A file at ``index`` that cannot be loaded is marked in
    ``replacements`` (a :class:`ReplacementLog`; its name is ``sample_name(index)``) and what comes
    instead depends on ``substitute``:

    * True (training): the sample at ``index + 1`` (wrapping around) is returned, then
      ``index + 2``, ... up to ``max_tries`` others, image and target; the batch keeps its size
      and the trainer counts the replacements from the log after the epoch.
    * False (evaluation): ``transform`` of a black placeholder image with target
      ``UNREADABLE_TARGET`` (-1), so batches still collate and every metric leaves the row out
      (``engine.evaluate`` does), since scoring a stand-in would measure a different set.

    Only loading is guarded: errors raised by the transform propagate. With ``strict=True`` the
    first unreadable file raises ``UnreadableImageError`` in either mode.

    Decoding inside the transform: when the transform has a ``decode_encoded`` method (the fast
    training pipeline, ``data.fast_transforms``) and the file can be read undecoded (``loader`` is
    ``load_rgb``, or ``base`` has ``read_bytes(index)`` as the zip reader does), loading is
    ``transform.decode_encoded(EncodedImage, seed)`` and is guarded as above, so a truncated file is
    still unreadable at load time; ``image`` is then ``transform`` of what it returned. The decode
    stage draws from the sample's seed as the transform does, and leaves the global generators be.

    The key may also be ``(index, seed)`` (what ``ResumableSampler(sample_seeds=True)``
    yields): the transform then draws its randomness from ``seed`` alone, whichever process
    or worker runs it, and the caller's RNG states are left as they were.
    """

    def __init__(
        self, base: Any, strict: bool = False, max_tries: int = MAX_REPLACEMENT_TRIES, substitute: bool = True
    ) -> None:
        for attr in ("samples", "loader", "transform", "target_transform", "classes"):
            if not hasattr(base, attr):
                raise TypeError(f"RobustImageDataset needs a dataset with .{attr}, got {type(base).__name__}")
        self.base = base
        self.strict = strict
        self.max_tries = max_tries
        self.substitute = substitute
        self.replacements = ReplacementLog(len(base.samples))

    def sample_name(self, index: int) -> str:
        """The path of sample ``index`` (how an unreadable one is named)."""
        return str(self.base.samples[index][0])

    @property
    def samples(self) -> Sequence[tuple[str, int]]:
        return self.base.samples

    @property
    def targets(self) -> list[int]:
        targets = getattr(self.base, "targets", None)
        return list(targets) if targets is not None else [t for _, t in self.base.samples]

    @property
    def classes(self) -> list[str]:
        return list(self.base.classes)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return getattr(self.base, "class_to_idx", {c: i for i, c in enumerate(self.base.classes)})

    @property
    def root(self) -> str:
        return str(getattr(self.base, "root", ""))

    @property
    def transform(self) -> Callable | None:
        return self.base.transform

    @property
    def target_transform(self) -> Callable | None:
        return self.base.target_transform

    def __len__(self) -> int:
        return len(self.base.samples)

    def _decode_stage(self) -> Callable[[EncodedImage, int | None], Any] | None:
        """The transform's ``decode_encoded`` when the files can be handed to it undecoded, else None."""
        decode = getattr(self.base.transform, "decode_encoded", None)
        if decode is None:
            return None
        if self.base.loader is load_rgb or callable(getattr(self.base, "read_bytes", None)):
            return decode
        return None

    def _read_encoded(self, index: int, path: str) -> EncodedImage:
        if self.base.loader is load_rgb:
            return load_encoded(path)
        return EncodedImage(self.base.read_bytes(index), path)

    def _try_load(self, index: int, seed: int | None = None) -> tuple[Any, int, str]:
        """The decoded image at ``index``, its target and "", or None, the target and why it failed.

        With a decode stage (see the class docstring) the "image" is what that stage returns for
        ``seed``.
        """
        path, target = self.base.samples[index]
        decode = self._decode_stage()
        try:
            if decode is None:
                return self.base.loader(path), target, ""
            return decode(self._read_encoded(index, path), seed), target, ""
        except UNREADABLE_ERRORS as e:
            # PIL reports corrupt data through all of these; anything else is a bug and propagates.
            return None, target, unreadable_reason(e)
