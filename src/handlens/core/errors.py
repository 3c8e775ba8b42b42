"""The errors handlens raises on purpose.

Every message says what went wrong *and how to fix it*: these strings reach users through the CLI
and the service unchanged.
"""

from __future__ import annotations


class HandlensError(Exception):
    """Base of every error handlens raises deliberately; the CLI prints it without a traceback."""

    exit_code = 1


class InputError(HandlensError):
    """The user asked for something that cannot be done as asked (bad flag, bad file, bad value)."""

    exit_code = 2


class NotFoundError(HandlensError):
    """A named dataset, labelset, split, run or bundle does not exist."""

    exit_code = 3


class ConflictError(HandlensError):
    """The request contradicts what is already stored (e.g. a name already taken)."""

    exit_code = 4


class CatalogVersionError(HandlensError):
    """The catalog was written by a different, incompatible version of handlens."""

    exit_code = 5
