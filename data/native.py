"""Small C helpers of the input pipeline, compiled on first use and loaded through ctypes.

Hot spots of the input pipeline that have no fast form in Pillow, torchvision or torch: decoding
only part of a JPEG (``jpeg_region.c``); RandAugment's rotate, shear, translate and sharpness and
Pillow's resize, with Pillow's exact arithmetic (``pillow_ops.c``). Each is a plain C file without
Python's API, built with the system's C compiler into a per-user cache, under a name carrying the
hash of its source (an edited file is rebuilt). Where that cannot be done (no compiler, a missing header or library)
``native_library`` returns None after one log line, and the caller keeps its portable path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Pillow's arithmetic is reproduced operation by operation: no fused multiply-adds, no reassociation.
# -O3 vectorises plain loops (the SMOOTH filter's byte-to-float rows: 0.18 ms per 224² image vs 0.31).
CFLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")


def cache_dir() -> Path:
    """Where compiled helpers are kept: ``$XDG_CACHE_HOME/swin-transformer`` (default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swin-transformer"


def private_temp_dir() -> Path:
    """``<temp>/swin-transformer-<uid>``, created 0700, refused (OSError) unless it is this user's
    own and writable by no one else: another user must not be able to plant a library there."""
    directory = Path(tempfile.gettempdir()) / f"swin-transformer-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{directory} is not a private folder of this user")
    return directory


def library_path(source: Path, libraries: Sequence[str] = (), directory: Path | None = None) -> Path:
    """The compiled file of ``source``: named by its stem, a hash of its text, the flags and the
    libraries (any change rebuilds), and the machine's architecture (a home folder shared by x86
    and Arm nodes keeps one build for each)."""
    recipe = source.read_bytes() + repr((CFLAGS, tuple(libraries))).encode()
    digest = hashlib.sha256(recipe).hexdigest()[:16]
    return (directory or cache_dir()) / f"{source.stem}-{digest}-{platform.machine() or 'unknown'}.so"


def build_library(source: Path, target: Path, libraries: Sequence[str] = ()) -> str | None:
    """Compile ``source`` into ``target``, linking ``libraries`` (e.g. ``("jpeg",)``); None on
    success, else why it failed, in one line.

    Written to a temporary name and renamed, so processes building at once never load half a file.
    """
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        return "no C compiler (cc) found"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    command = [*compiler, *CFLAGS, "-o", partial, str(source), *(f"-l{name}" for name in libraries)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            said = done.stderr.splitlines()
            lines = [line for line in said if "error" in line or "cannot find" in line] or said
            return (lines[0] if lines else f"{compiler[0]} exited with {done.returncode}").strip()
        os.chmod(partial, 0o755)  # mkstemp made it 0600: others sharing the cache could not load it
        os.replace(partial, target)
        return None
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def native_library(source: Path, libraries: Sequence[str] = (), purpose: str = "") -> ctypes.CDLL | None:
    """``source`` compiled (if its file is missing) and loaded; None, with one warning naming
    ``purpose`` and the reason, where it cannot be had. Callers cache the result per process."""
    path = library_path(source, libraries)
    problem = None
    if not path.exists():
        try:
            problem = build_library(source, path, libraries)
        except OSError:  # e.g. a read-only home: build in a private temporary folder instead
            try:
                path = library_path(source, libraries, private_temp_dir())
                problem = None if path.exists() else build_library(source, path, libraries)
            except OSError as error:
                problem = str(error)
    if problem is None:
        try:
            return ctypes.CDLL(str(path))
        except OSError as error:
            problem = str(error)
    logger.warning("%s unavailable (%s): %s", source.name, purpose or "a faster path", problem)
    return None
