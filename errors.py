"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem with the user's input: one line that says what is wrong and what to do.

    ``main.py`` prints it without a traceback (unless ``--debug``) and exits non-zero.
    """
