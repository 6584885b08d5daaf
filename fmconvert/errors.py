"""Errors the command line turns into one-line messages and exit codes."""


class FmconvertError(Exception):
    """A runtime failure (exit code 1): the message names the problem and the fix."""

    exit_code = 1


class UsageError(FmconvertError):
    """Something the user typed is wrong (exit code 2): a bad option value or a missing path."""

    exit_code = 2


def check_choice(parameter: str, value: object, choices) -> None:
    """Refuse a ``value`` of ``parameter`` that is not one of ``choices`` (a registry or a tuple):
    UsageError ``unknown parameter='value': use one of ...``, the one wording every refusal of an
    unknown choice has (the command line shows the parameter as its flag)."""
    if value not in choices:
        raise UsageError(f"unknown {parameter}={value!r}: use one of {', '.join(choices)}")
