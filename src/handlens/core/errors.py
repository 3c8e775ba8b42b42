"""The errors handlens raises on purpose.

Every message says what went wrong *and how to fix it*: these strings reach users through the CLI
and the service unchanged.
"""

from __future__ import annotations


class HandlensError(Exception):
    """Base of every error handlens raises deliberately; the CLI prints it without a traceback and exits with
    ``exit_code``, the service answers ``http_status`` with the message as ``detail``."""

    exit_code = 1
    http_status = 500


class InputError(HandlensError):
    """The user asked for something that cannot be done as asked (bad flag, bad file, bad value)."""

    exit_code = 2
    http_status = 422


class NotFoundError(HandlensError):
    """A named dataset, labelset, split, run or bundle does not exist."""

    exit_code = 3
    http_status = 404


class ConflictError(HandlensError):
    """The request contradicts what is already stored (e.g. a name already taken)."""

    exit_code = 4
    http_status = 409


class CatalogVersionError(HandlensError):
    """The catalog was written by a different, incompatible version of handlens."""

    exit_code = 5


class ForbiddenError(HandlensError):
    """The request needs a permission it does not carry (the service's API key, its own origin)."""

    exit_code = 6
    http_status = 403


class BusyError(HandlensError):
    """A shared resource (the catalog database, the service's decoding budget) is busy: retry shortly."""

    exit_code = 7
    http_status = 503


class TooLargeError(InputError):
    """An input beyond a size limit (bytes, pixels, nesting): refused before it is read in full."""

    http_status = 413


class UnsupportedMediaError(InputError):
    """Content of a type this part of handlens does not read (checked by content, never by name)."""

    http_status = 415


class DiskFullError(HandlensError):
    """A write failed because the disk (or the user's quota) is full."""

    exit_code = 8
    http_status = 507  # Insufficient Storage
