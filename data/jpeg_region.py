"""One rectangle of a JPEG, decoded by libjpeg-turbo without the IDCT of the rest (``jpeg_region.c``).

A random resized crop keeps about half of a photo; decoding all of it only to crop spends the
IDCT, chroma upsampling and colour conversion of the other half. libjpeg-turbo's partial
decoding (``jpeg_skip_scanlines``, ``jpeg_crop_scanline``) skips those stages outside the
rectangle, and the pixels inside are the ones a full decode gives (tested against Pillow's, at
full and at 1/2, 1/4, 1/8 scale, for 4:4:4, 4:2:2, 4:2:0, progressive and greyscale files).

Neither Pillow nor torchvision exposes it, so the 100 lines of C are compiled on first use with
the system's C compiler against its libjpeg(-turbo) headers (Debian: ``libjpeg62-turbo-dev``),
into a per-user cache keyed by the source's hash, and called through ctypes. Where that cannot
be done (no compiler, no headers, a libjpeg without partial decoding) ``region_decoder()`` is
None, one log line says why, and callers decode whole images as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("jpeg_region.c")
# Return codes of jpeg_region_decode (jpeg_region.c).
REGION_OK = 0


def cache_dir() -> Path:
    """Where the compiled library is kept: ``$XDG_CACHE_HOME/swin-transformer`` (default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swin-transformer"


def library_path(directory: Path | None = None) -> Path:
    """The library's file: named by the hash of the C source, so an edited source is rebuilt."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return (directory or cache_dir()) / f"jpeg_region-{digest}.so"


def build_library(target: Path) -> str | None:
    """Compile ``jpeg_region.c`` into ``target``; None on success, else why it failed (one line).

    Written to a temporary name and renamed, so processes building at once never load half a file.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (cc) found"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    command = [compiler, "-O2", "-shared", "-fPIC", "-o", partial, str(SOURCE), "-ljpeg"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            return (lines[0] if lines else f"{compiler} exited with {done.returncode}").strip()
        os.replace(partial, target)
        return None
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.cache
def region_decoder() -> ctypes.CDLL | None:
    """The loaded library (built first if its file is missing), or None where it cannot be had."""
    path = library_path()
    problem = None
    if not path.exists():
        try:
            problem = build_library(path)
        except OSError:  # e.g. a read-only home: build in the temporary directory instead
            path = library_path(Path(tempfile.gettempdir()) / "swin-transformer")
            problem = None if path.exists() else build_library(path)
    if problem is None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as error:
            problem = str(error)
    if problem is not None:
        logger.warning("partial JPEG decoding unavailable, whole images are decoded instead: %s", problem)
        return None
    lib.jpeg_region_decode.restype = ctypes.c_int
    lib.jpeg_region_decode.argtypes = (
        [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int] + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    )
    return lib


def decode_region(data: bytes | memoryview, box: tuple[int, int, int, int], scale: int = 1) -> torch.Tensor | None:
    """The RGB pixels of ``box`` = (top, left, height, width) of the JPEG ``data`` decoded at
    1/``scale`` (1, 2, 4 or 8; the box in that scaled image's pixels): uint8 (3, height, width)
    with (height, width, 3) memory, equal to the same box of a full decode at that scale.

    None where the library is unavailable, and for data it declines: a colour space other than
    greyscale, YCbCr or RGB (CMYK), a box outside the image, data that does not end with JPEG's
    end-of-image marker (a truncated file, whatever the box; also a file with bytes after the
    marker), and anything libjpeg warns or errs about while decoding down to the box's last row.
    The caller's whole decode then decides, as it always did, so a file Pillow refuses is refused.
    The rows below the box are not decoded at all: damage there that Pillow would refuse (an
    error, not one of libjpeg's warnings, which Pillow ignores) goes unnoticed for this sample.
    """
    lib = region_decoder()
    if lib is None:
        return None
    top, left, height, width = box
    encoded = np.frombuffer(data, dtype=np.uint8)
    out = torch.empty((height, width, 3), dtype=torch.uint8)
    code = lib.jpeg_region_decode(
        encoded.ctypes.data, encoded.size, scale, left, top, width, height, ctypes.c_void_p(out.data_ptr())
    )
    return out.permute(2, 0, 1) if code == REGION_OK else None
