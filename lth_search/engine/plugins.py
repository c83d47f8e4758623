"""Your own model or data set: `model.name` / `data.name` beyond the built-in registries.

A name that is not built in is resolved, in this order, as

- an entry point of group `lth_search.models` / `lth_search.data` (a package registers
  `[project.entry-points."lth_search.models"] mynet = "mypkg.nets:build"`), then
- an import target `package.module:factory` (the module must be importable where the
  trials run: installed, or on PYTHONPATH of every Ray worker) whose factory is marked
  as a plug-in with `@lth_search.plugin` (`plugin` below).

Trust: a config is data, and may come from someone else. It can name only code its
user installed or marked: an entry point (installing a package is consent), or a
callable that carries the mark. Anything else (`os:remove`, `shutil:rmtree`, any
unmarked function of an installed package) is refused in one line before it is
called; a module of Python's standard library is not even imported.

A model factory is called as `factory(input_shape, num_classes)` and returns an
`nn.Module` taking a batch of inputs shaped `(batch, *input_shape)` and returning
`(batch, num_classes)` logits. A data factory is called as `factory(root)` (the
config's `data.root`, a Path) and returns numpy arrays `(x_train, y_train, x_test,
y_test)`, labels 0..C-1. Everything else (the seeded validation carve, normalisation,
fingerprint, layer groups, pruning, the store, tickets) works on them unchanged.
"""

from __future__ import annotations

import inspect
import re
import sys
from importlib import import_module
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable, TypeVar

from lth_search.errors import ConfigError, first_line

MODEL_GROUP = "lth_search.models"
DATA_GROUP = "lth_search.data"
TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
"""`package.module:attribute` (the attribute may be dotted: `module:Class.build`)."""
MARK = "__lth_search_plugin__"
"""The attribute `plugin` sets to True on a factory an import target may name."""

FactoryT = TypeVar("FactoryT")


def plugin(factory: FactoryT) -> FactoryT:
    """Mark `factory` as a plug-in that a config's `model.name` / `data.name` may name.

        from lth_search import plugin

        @plugin
        def small_cnn(input_shape, num_classes): ...

    Only the mark is set; the function is returned unchanged. A module that must also
    import where lth-search is not installed (a served ticket bundles the model's
    module) can set `small_cnn.__lth_search_plugin__ = True` itself.
    """
    setattr(factory, MARK, True)
    return factory


def is_marked(factory: Any) -> bool:
    """Whether `factory` carries the plug-in mark itself (read without running any of its code).

    The attribute is looked up statically, so an object whose `__getattr__` answers
    anything is not marked; a class is marked by its own dict, not by a marked base.
    """
    target = factory.__func__ if inspect.ismethod(factory) else factory
    if isinstance(target, type):
        return target.__dict__.get(MARK) is True
    try:
        return inspect.getattr_static(target, MARK, None) is True
    except Exception:  # noqa: BLE001 - an odd object is simply not marked
        return False


def _entry_point(group: str, name: str) -> Any:
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    return found[0] if found else None


def _import_target(field: str, target: str) -> Callable[..., Any]:
    module_name, _, attribute = target.partition(":")
    top = module_name.split(".", 1)[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ConfigError(
            f"{field}: {target!r} is in Python's standard library, not a plug-in; name a factory marked "
            "with @lth_search.plugin or an installed entry point (see docs/own-model-and-data.md)"
        )
    value: Any = import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def resolve(field: str, kind: str, name: str, group: str, builtin: tuple[str, ...]) -> Callable[..., Any]:
    """The factory `name` stands for; ConfigError naming `field` when there is none."""
    try:
        if TARGET.match(name):
            factory = _import_target(field, name)
            if not is_marked(factory):
                raise ConfigError(
                    f"{field}: {name!r} is not marked as a plug-in, so it is not called; mark the factory with "
                    "@lth_search.plugin (or install it as an entry point of group "
                    f"{group}), see docs/own-model-and-data.md"
                )
        else:
            point = _entry_point(group, name)
            if point is None:
                plugins = ", ".join(sorted(ep.name for ep in entry_points(group=group))) or "none installed"
                raise ConfigError(
                    f"{field}: unknown {kind} {name!r}; choose one of {', '.join(builtin)}, a plug-in of entry point "
                    f"group {group} ({plugins}), or an import target package.module:factory"
                )
            factory = point.load()
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - a module that fails on import is the user's code, not ours
        raise ConfigError(f"{field}: cannot import {name!r} ({type(error).__name__}: {first_line(error)})") from None
    if not callable(factory):
        raise ConfigError(f"{field}: {name!r} is not callable (a factory function or class is needed)")
    return factory


def factory_module(factory: Callable[..., Any]) -> ModuleType:
    """The module a factory was defined in (a served model bundles its code)."""
    return import_module(factory.__module__)
