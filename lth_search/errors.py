"""Errors a user can cause and fix.

Every error a researcher can trigger with bad input derives from `LthError`. The CLI
prints such an error as one line (no traceback) and exits non-zero, so messages must
name the config key or file at fault and say what would be valid.
"""

from __future__ import annotations


class LthError(Exception):
    """Base class for user-facing errors: the message is the whole explanation."""


class ConfigError(LthError):
    """A config file, key or value is invalid."""


class DataError(LthError):
    """A data set is unknown, missing or malformed."""


class StoreError(LthError):
    """The stage store cannot be opened or a key is unsafe."""


class TrackingError(LthError):
    """MLflow holds nothing that answers the request (no experiment, no ticket)."""
