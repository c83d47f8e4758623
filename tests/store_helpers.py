"""Stores on the three kinds of filesystem the tests use, and entries to put in them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import torch

from lth_search.store.content_keys import content_key
from lth_search.store.entry import StageEntry
from lth_search.store.stage_store import StageStore

KINDS = ["local", "file_uri", "memory"]


def make_store(kind: str, tmp_path: Path, **kwargs) -> StageStore:
    if kind == "local":
        return StageStore(str(tmp_path / "store"), **kwargs)
    if kind == "file_uri":
        return StageStore(f"file://{tmp_path}/store", **kwargs)
    memory = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    return StageStore(f"/lth-test-{uuid.uuid4().hex}", filesystem=memory, **kwargs)  # the memory fs is process-wide


def key_of(name: str) -> str:
    return content_key({"stage": name})


def make_entry(key: str, seed: int = 0, kind: str = "round") -> StageEntry:
    generator = torch.Generator().manual_seed(seed)
    state = {"fc.weight": torch.randn(20, 9, generator=generator), "fc.bias": torch.randn(20, generator=generator).half()}
    return StageEntry(
        key=key,
        kind=kind,
        inputs={"parent": "0" * 64, "rate": 0.2, "seed": seed},
        metrics={"val_accuracy": 0.61 + seed / 100, "sparsity": 0.2, "loss": float("nan")},
        weights={"init": state, "end": {k: v * 2 for k, v in state.items()}},
        masks={"mask": {"fc.weight": torch.rand(20, 9, generator=generator) > 0.2}},
    )


def assert_same(a: StageEntry, b: StageEntry) -> None:
    assert (a.key, a.kind, a.inputs) == (b.key, b.kind, b.inputs)
    assert json.dumps(a.metrics) == json.dumps(b.metrics)  # NaN-safe comparison
    assert a.weights.keys() == b.weights.keys() and a.masks.keys() == b.masks.keys()
    for name in a.weights:
        assert a.weights[name].keys() == b.weights[name].keys()
        for tensor in a.weights[name]:
            assert torch.equal(a.weights[name][tensor], b.weights[name][tensor])
            assert a.weights[name][tensor].dtype == b.weights[name][tensor].dtype
    for name in a.masks:
        for layer in a.masks[name]:
            assert torch.equal(a.masks[name][layer], b.masks[name][layer])


def entry_file(store: StageStore, key: str, filename: str) -> str:
    """The documented layout: stages/<key[:2]>/<key>/<file>."""
    return f"{store.root}/stages/{key[:2]}/{key}/{filename}"


def read_file(store: StageStore, path: str) -> bytes:
    with store.filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_file(store: StageStore, path: str, data: bytes) -> None:
    with store.filesystem.open_output_stream(path) as stream:
        stream.write(data)
