"""Errors a user can cause and fix.

Every error a researcher can trigger with bad input derives from `LthError`. The CLI
prints such an error as one line (no traceback), so messages must name the config key or
file at fault and say what would be valid. The class decides the exit code, as scripts
expect of a command line: 2 for usage and configuration errors (fix the command), 1 for
a `RuntimeFailure` (the command was right, the world did not answer: no ticket matches,
MLflow is down).
"""

from __future__ import annotations


class LthError(Exception):
    """Base class for user-facing errors: the message is the whole explanation."""


class RuntimeFailure(LthError):
    """The command was valid but could not be carried out (exit 1, not 2)."""


class ConfigError(LthError):
    """A config file, key or value is invalid."""


class DataError(LthError):
    """A data set is unknown, missing or malformed."""


class StoreError(LthError):
    """The stage store cannot be opened or a key is unsafe."""


class TrackingError(RuntimeFailure):
    """MLflow holds nothing that answers the request (no experiment, no ticket)."""
