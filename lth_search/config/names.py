"""The two kinds of text that become paths: names and locations, each checked in one place.

A *name* (search name, MLflow experiment, record namespace and name, a `resume`/`sync`
argument, a stage's weight-set name) becomes one path component under `output_dir` or
the store; `check_name` keeps it from leaving its folder (no '/', no '..', no leading
'.', no control characters, a bounded length). A *location* (output_dir, data.root,
store.uri, tracking.uri, `best --out`) may be any path or URI, but not one that the OS
refuses or mangles (NUL bytes, newlines) or that is absurdly long; `check_location`
says so in one line before anything is written.

A *registered name* (data.name, model.name) never becomes a path: it names a data set
or model in a registry, or an import target; `check_registered_name` is its one rule.
"""

from __future__ import annotations

import re
import reprlib

from lth_search.errors import ConfigError

NAME_MAX = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_REGISTERED_RE = re.compile(r"^([A-Za-z_][\w.-]*|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$")
LOCATION_MAX = 4096
QUOTE_MAX = 60
"""At most this many characters of a user's input are quoted back in a message."""

READ_ONLY_SCHEMES = frozenset({"http", "https"})
"""fsspec opens these read-only: no store can live there."""
TRACKING_SCHEMES = frozenset({
    "sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc",
})
"""What MLflow accepts as a tracking URI scheme (a `+driver` suffix is allowed: postgresql+psycopg2)."""


_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 2, 4, 6, 6, 6
_SHORT.maxstring = _SHORT.maxother = QUOTE_MAX


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """A short repr of a user's input: a YAML alias bomb's repr would be megabytes (reprlib never builds it)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def check_name(value: object, what: str, error: type[Exception] = ConfigError, max_len: int = NAME_MAX) -> str:
    """`value` if it is a safe path component of at most `max_len` characters, else `error` naming `what`."""
    if isinstance(value, str) and len(value) <= max_len and _NAME_RE.fullmatch(value):
        return value
    raise error(
        f"{what} {quote(value)} is invalid: use 1-{max_len} letters, digits, '_', '.' or '-', "
        "starting with a letter or digit"
    )


def check_registered_name(value: str) -> str:
    """`value` if it can name a data set or model: a registered name (built in or an entry point)
    or an import target package.module:factory; else ValueError (pydantic names the field).

    Which names exist is the registries' business (engine/data.py, engine/models.py).
    """
    if not _REGISTERED_RE.match(value):
        raise ValueError(f"must be a registered name or an import target package.module:factory, got {value!r}")
    return value


def check_location(value: object, what: str, error: type[Exception] = ConfigError) -> str:
    """`value` if it is a usable path or URI (text, no NUL or line breaks, bounded), else `error` naming `what`."""
    if not isinstance(value, str) or not value.strip():
        raise error(f"{what} must be a non-empty path or URI, got {quote(value)}")
    if len(value) > LOCATION_MAX:
        raise error(f"{what} is {len(value)} characters long; at most {LOCATION_MAX}")
    bad = next((c for c in value if c in "\x00\n\r"), None)
    if bad is not None:
        raise error(f"{what} {quote(value)} contains {bad!r}; a path or URI cannot")
    return value


def scheme_of(uri: str) -> str | None:
    """The lowercase scheme of a URI (`s3` of s3://b/x), or None for a plain path."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else None


def check_store_uri(value: str, what: str = "store.uri", error: type[Exception] = ConfigError) -> str:
    """A store location that can be written: not a read-only scheme such as http://."""
    check_location(value, what, error)
    scheme = scheme_of(value)
    if scheme in READ_ONLY_SCHEMES:
        raise error(f"{what} {quote(value)}: {scheme}:// is read-only; use a path, s3://, gs:// or another writable filesystem")
    return value


def check_tracking_uri(value: str, what: str = "tracking.uri", error: type[Exception] = ConfigError) -> str:
    """A tracking URI whose scheme MLflow knows (a plain path is left to MLflow)."""
    check_location(value, what, error)
    scheme = scheme_of(value)
    if scheme is not None and scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        known = ", ".join(sorted(TRACKING_SCHEMES))
        raise error(f"{what} {quote(value)}: unknown scheme {scheme}://; use one of {known}")
    return value


__all__ = [
    "check_location", "check_name", "check_registered_name", "check_store_uri", "check_tracking_uri", "quote", "scheme_of",
]
