"""Logging setup: one file per rank, colored console output on rank 0 only.

Library modules log through children of the ``swin`` logger (``logging.getLogger('swin.x')``)
so their records reach the handlers installed here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from termcolor import colored

_FMT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"
# Marks handlers installed by create_logger, so a second call replaces only ours.
_OWNED = "_swin_owned"


def is_interactive() -> bool:
    """True when stdout is a terminal (progress output and colors make sense)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def create_logger(output_dir: str, dist_rank: int = 0, name: str = "swin") -> logging.Logger:
    """The logger ``name`` writing to ``output_dir/log_rank{dist_rank}.txt`` (appending).

    Rank 0 also writes INFO and above to stdout with a colored prefix (time green, file:line
    yellow; termcolor drops colors when stdout is not a terminal). Other ranks log only to
    their file, so the console shows one copy of each line.

    The same handlers are attached to the root logger (level INFO), so modules that log via
    ``logging.getLogger(__name__)`` land in the same file and console; ``name`` itself does
    not propagate, so its records appear once. Idempotent: calling again with the same
    arguments adds no handlers; with different ones it replaces the handlers it installed.
    """
    os.makedirs(output_dir, exist_ok=True)
    logger = logging.getLogger(name)
    root = logging.getLogger()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    log_file = os.path.abspath(os.path.join(output_dir, f"log_rank{dist_rank}.txt"))
    want_console = dist_rank == 0
    owned = [h for h in logger.handlers if getattr(h, _OWNED, False)]
    have_file = any(isinstance(h, logging.FileHandler) and h.baseFilename == log_file for h in owned)
    have_console = any(not isinstance(h, logging.FileHandler) for h in owned)
    if owned and have_file and have_console == want_console and len(owned) == 1 + int(want_console):
        return logger
    for lg in (logger, root):
        for h in [h for h in lg.handlers if getattr(h, _OWNED, False)]:
            lg.removeHandler(h)
            h.close()

    handlers: list[logging.Handler] = []
    file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(_FMT, datefmt=_DATEFMT))
    handlers.append(file_handler)
    if want_console:
        color_fmt = (
            colored("[%(asctime)s %(name)s]", "green")
            + " "
            + colored("(%(filename)s %(lineno)d)", "yellow")
            + ": %(levelname)s %(message)s"
        )
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter(color_fmt, datefmt=_DATEFMT))
        handlers.append(console)
    for h in handlers:
        setattr(h, _OWNED, True)
        logger.addHandler(h)
        root.addHandler(h)
    # Root defaults to WARNING, which would drop INFO lines of modules outside ``name``.
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return logger


@contextlib.contextmanager
def script_console(*names: str) -> Iterator[None]:
    """For a script's ``main``: INFO messages of the loggers ``names`` printed bare on stderr while
    the block runs, the handler removed after it (tests call ``main`` in-process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    owners = [logging.getLogger(n) for n in names]
    for lg in owners:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg in owners:
            lg.removeHandler(handler)
