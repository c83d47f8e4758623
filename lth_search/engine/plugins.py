"""Your own model or data set: `model.name` / `data.name` beyond the built-in registries.

A name that is not built in is resolved, in this order, as

- an entry point of group `lth_search.models` / `lth_search.data` (a package registers
  `[project.entry-points."lth_search.models"] mynet = "mypkg.nets:build"`), then
- an import target `package.module:factory` (the module must be importable where the
  trials run: installed, or on PYTHONPATH of every Ray worker).

A model factory is called as `factory(input_shape, num_classes)` and returns an
`nn.Module` taking a batch of inputs shaped `(batch, *input_shape)` and returning
`(batch, num_classes)` logits. A data factory is called as `factory(root)` (the
config's `data.root`, a Path) and returns numpy arrays `(x_train, y_train, x_test,
y_test)`, labels 0..C-1. Everything else (the seeded validation carve, normalisation,
fingerprint, layer groups, pruning, the store, tickets) works on them unchanged.
"""

from __future__ import annotations

import re
from importlib import import_module
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable

from lth_search.errors import ConfigError

MODEL_GROUP = "lth_search.models"
DATA_GROUP = "lth_search.data"
TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
"""`package.module:attribute` (the attribute may be dotted: `module:Class.build`)."""


def _entry_point(group: str, name: str) -> Any:
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    return found[0] if found else None


def _import_target(target: str) -> Callable[..., Any]:
    module_name, _, attribute = target.partition(":")
    value: Any = import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def resolve(field: str, kind: str, name: str, group: str, builtin: tuple[str, ...]) -> Callable[..., Any]:
    """The factory `name` stands for; ConfigError naming `field` when there is none."""
    try:
        if TARGET.match(name):
            factory = _import_target(name)
        else:
            point = _entry_point(group, name)
            if point is None:
                plugins = ", ".join(sorted(ep.name for ep in entry_points(group=group))) or "none installed"
                raise ConfigError(
                    f"{field}: unknown {kind} {name!r}; choose one of {', '.join(builtin)}, a plug-in of entry point "
                    f"group {group} ({plugins}), or an import target package.module:factory"
                )
            factory = point.load()
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{field}: cannot import {name!r} ({type(error).__name__}: {error})") from None
    if not callable(factory):
        raise ConfigError(f"{field}: {name!r} is not callable (a factory function or class is needed)")
    return factory


def factory_module(factory: Callable[..., Any]) -> ModuleType:
    """The module a factory was defined in (a served model bundles its code)."""
    return import_module(factory.__module__)
