"""Errors a user can cause and fix, and failures of the machine underneath.

Every error lth-search raises on purpose derives from `LthError`. The CLI prints such an
error as one line (no traceback) and exits with its `exit_code`, as scripts expect of a
command line: 2 for input a user can correct (a config key, a file, a name: fix the
command), 1 for a `RuntimeFailure` (the command was right, the world did not answer: a
full disk, a store or tracking server away, no ticket that matches). Messages name the
config key or file at fault and say what would be valid.
"""

from __future__ import annotations

import errno
import os
import re

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class LthError(Exception):
    """Base class for user-facing errors: the message is the whole explanation."""

    exit_code = EXIT_USAGE


class RuntimeFailure(LthError):
    """The command was valid but could not be carried out. Exit code 1.

    Whatever was stored before the failure stays stored; the message says how to continue.
    """

    exit_code = EXIT_RUNTIME


class ConfigError(LthError):
    """A config file, key or value is invalid."""


class DataError(LthError):
    """A data set is unknown, missing or malformed."""


class StoreError(LthError):
    """The stage store cannot be opened or a key is unsafe."""


class TrackingError(RuntimeFailure):
    """MLflow holds nothing that answers the request (no experiment, no ticket)."""


class StoreFailure(RuntimeFailure, StoreError):
    """The store could not be read or written (disk full, gone, no permission); nothing half-written remains."""


class UnknownTrackingName(LthError):
    """A name or file the user gave to `best` / `tickets` names nothing readable: an unknown
    `--experiment` or `--search-run-id`, a file that is not an MLflow database. Exit 2: fix the command."""


class TrackingFailure(TrackingError):
    """MLflow did not answer, or not for everything asked; `lth-search sync` can catch up."""


_PYARROW_ERRNO = re.compile(r"\[errno (\d+)\]")


def _os_errno(error: BaseException) -> int | None:
    """The errno of a failed filesystem call: Python's attribute, or the "[errno N]" pyarrow writes into its message."""
    number = getattr(error, "errno", None)
    if number is None:
        found = _PYARROW_ERRNO.search(str(error))
        number = int(found.group(1)) if found else None
    return number


def os_reason(error: BaseException) -> str:
    """Why a filesystem call failed, in a few words ("No space left on device"), for one-line messages.

    pyarrow puts its whole message, file path and all, into `strerror`; the errno's own words are shorter.
    """
    number = _os_errno(error)
    if number is not None:
        return os.strerror(number)
    strerror = getattr(error, "strerror", None)
    if strerror:
        return strerror
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def os_remedy(error: BaseException) -> str:
    """What to do about a failed filesystem call, for the end of a one-line message."""
    number = _os_errno(error)
    if number == errno.ENOSPC or number == getattr(errno, "EDQUOT", None):
        return "free space"
    if number in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make it writable"
    return "fix it"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
