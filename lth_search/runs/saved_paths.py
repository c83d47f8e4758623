"""Saved state holds paths relative to its folder, so a copied or moved folder resumes as itself.

A search keeps search.json, its journal and Ray's results beside its store, under one
*root*: the folder that holds `store/`, `searches/` and `ray/` (the output folder, with
the default store). Whatever lies under that root is written relative to it and listed
in the file's `relative` field; on reading, those entries are joined onto the root the
file was found under. `cp -a OUT COPY; lth-search resume NAME --output-dir COPY` then
touches only COPY, and `mv OUT NEW` resumes from NEW. Paths outside the root (a data
folder elsewhere, a tracking server) are kept as they are: they did not move.

In memory everything stays absolute: Ray trials chdir into their own folders.
"""

from __future__ import annotations

from typing import Any

from lth_search.store.uri import beside

CONFIG_PATHS = ("config.output_dir", "config.store.uri", "config.data.root", "config.tracking.uri")
"""The config's paths (dotted keys in a saved dict) that may lie under the root."""
PREFIXES = ("sqlite:///", "file://", "")
"""What may stand before a path: an MLflow sqlite URI, a file URI, nothing (longest first)."""
HERE = "."


def state_root(store_uri: str) -> str:
    """The folder that holds the store, `searches/` and `ray/` (a path or a URI)."""
    return beside(store_uri, "searches").rsplit("/", 1)[0] or "/"


def _split(value: str) -> tuple[str, str]:
    for prefix in PREFIXES:
        if value.startswith(prefix):
            return prefix, value[len(prefix):]
    return "", value  # unreachable: "" matches everything


def relative(value: Any, root: str) -> str | None:
    """`value` relative to `root` (keeping a sqlite:/// or file:// prefix), or None when it is not under it."""
    if not isinstance(value, str):
        return None
    prefix, path = _split(value)
    base = root.rstrip("/")
    if path.rstrip("/") == base:
        return prefix + HERE
    if path.startswith(base + "/"):
        return prefix + path[len(base) + 1:]
    return None


def anchored(value: str, root: str) -> str:
    """A relative entry joined onto `root` again (the inverse of `relative`).

    ValueError for an entry that would leave the root ('..', an absolute path): saved
    state names places inside its folder, never outside.
    """
    prefix, path = _split(value)
    if path.startswith("/") or "://" in path or ".." in path.split("/"):
        raise ValueError(f"{value!r} is not a path inside its folder")
    base = root.rstrip("/") or "/"
    return prefix + (base if path == HERE else f"{base.rstrip('/')}/{path}")


def _get(data: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    *parents, last = key.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), last


def to_saved(data: dict[str, Any], root: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `data` whose `keys` under `root` are relative, listed in `data["relative"]`.

    Only the dicts on the way to a changed key are copied; the rest is shared with `data`
    (a record's config is most of it, and a trial saves its record at every stage), so the
    copy is for writing out, not for changing in place."""
    saved = dict(data)
    made: list[str] = []
    for key in keys:
        node, last = _get(saved, key)
        if node is None:
            continue
        rel = relative(node.get(last), root)
        if rel is not None:
            _spine(saved, key)[last] = rel
            made.append(key)
    saved["relative"] = made
    return saved


def _spine(saved: dict[str, Any], key: str) -> dict[str, Any]:
    """The dict holding `key`'s last part, each dict on the way to it copied into `saved` first."""
    node = saved
    for part in key.split(".")[:-1]:
        node[part] = dict(node[part])
        node = node[part]
    return node


def from_saved(data: dict[str, Any], root: str) -> dict[str, Any]:
    """`data` (as `to_saved` wrote it) with its relative entries joined onto `root`, in place.

    State written before paths were relative has no `relative` list and is taken as it is.
    """
    made = data.pop("relative", None) if isinstance(data, dict) else None
    for key in made if isinstance(made, list) else []:
        node, last = _get(data, str(key))
        if node is not None and isinstance(node.get(last), str):
            node[last] = anchored(node[last], root)
    return data
