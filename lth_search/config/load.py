"""Loading a config: YAML file, `--set KEY=VALUE` overrides, one-line errors naming the key.

The schema (schema.py and its section modules) holds every default; this module only
turns text into a validated `ExperimentConfig` and pydantic's errors into one line a
user can act on.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import yaml

from lth_search.config.names import check_location, quote
from lth_search.config.schema import ExperimentConfig, validate_config
from lth_search.errors import ConfigError


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=yaml-value` override to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {quote(assignment)}: expected KEY=VALUE, e.g. prune.rate=0.2")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise ConfigError(f"--set {quote(key)}: not a dotted config key such as prune.rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {quote(raw)} is not valid YAML") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


CONFIG_MAX_BYTES = 1 << 20
"""A config is a page of YAML; anything bigger (or endless, like /dev/zero) is not one."""


def read_config_text(path: Path) -> str:
    """The text of config file `path`: a regular file of at most CONFIG_MAX_BYTES, UTF-8; else ConfigError.

    A device, a FIFO or a directory is refused before it is opened (reading /dev/zero
    would fill memory; opening a FIFO would wait forever).
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop on some Pythons
        raise ConfigError(f"{path}: cannot read config file ({getattr(error, 'strerror', None) or type(error).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file; a config is a YAML file")
    if info.st_size > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path}: {info.st_size} bytes; a config file holds at most {CONFIG_MAX_BYTES} bytes")
    try:
        with open(path, "rb") as stream:
            data = stream.read(CONFIG_MAX_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file ({error.strerror or type(error).__name__})") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path}: more than {CONFIG_MAX_BYTES} bytes; a config file holds at most that")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read config file (not UTF-8 text)") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(check_location(str(path), "config file"))
        text = read_config_text(path)
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} YAML syntax error ({getattr(error, 'problem', error)})") from None
        except RecursionError:
            raise ConfigError(f"{path}: YAML nested too deeply to be a config") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_config(data, source=str(path) if path is not None else "config")
