"""Errors the command line turns into one-line messages and exit codes."""


class FmconvertError(Exception):
    """A runtime failure (exit code 1): the message names the problem and the fix."""

    exit_code = 1


class UsageError(FmconvertError):
    """Something the user typed is wrong (exit code 2): a bad option value or a missing path."""

    exit_code = 2
