"""The one exception type for mistakes a user can make and fix, and how a CLI reports it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with the user's input: one line that says what is wrong and what to do.

    ``main.py`` and the scripts print it without a traceback (unless ``--debug``) and exit 2.
    """


def report_user_errors(run: Callable[[], Any], debug: bool = False) -> int:
    """Call ``run()``; return 0, or 2 after printing ``error: <message>`` for a ``UserError``.

    With ``debug`` the error propagates with its traceback instead. Other exceptions are bugs
    and always propagate.
    """
    try:
        run()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
