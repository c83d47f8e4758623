"""Mask and weight formats: exact round trips, documented Parquet columns, size, validation."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lth_search.store.codec import (
    decode_manifest,
    decode_mask,
    decode_weights,
    encode_manifest,
    encode_mask,
    encode_weights,
)

SHAPES = [(), (1,), (7,), (8,), (9,), (3, 5), (300, 100), (16, 3, 3, 3), (0,), (0, 4), (2, 3, 5, 7)]


def random_mask(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < density


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_mask_round_trip_is_exact(density: float) -> None:
    mask = {f"layer{i}.weight": random_mask(shape, density, seed=i) for i, shape in enumerate(SHAPES)}
    decoded = decode_mask(encode_mask(mask))
    assert list(decoded) == list(mask)  # layer order kept
    for name, tensor in mask.items():
        assert decoded[name].dtype == torch.bool
        assert decoded[name].shape == tensor.shape
        assert torch.equal(decoded[name], tensor), name


def test_all_kept_empty_kept_and_non_contiguous_layers() -> None:
    base = random_mask((6, 10), 0.3)
    mask = {
        "none": torch.zeros(13, 3, dtype=torch.bool),
        "all": torch.ones(11, dtype=torch.bool),
        "transposed": base.t(),  # not contiguous: row-major order of the logical tensor
        "scalar": torch.tensor(True),
    }
    decoded = decode_mask(encode_mask(mask))
    for name, tensor in mask.items():
        assert torch.equal(decoded[name], tensor), name


def test_parquet_has_the_documented_columns(tmp_path: Path) -> None:
    mask = {"fc1.weight": random_mask((5, 13), 0.4), "fc2.weight": random_mask((3,), 0.9, seed=1)}
    path = tmp_path / "mask.parquet"
    path.write_bytes(encode_mask(mask))
    table = pq.read_table(path)  # a plain Arrow reader, as any tool would use
    assert table.schema.names == ["name", "shape", "numel", "kept", "bits"]
    assert table.schema.field("name").type == pa.string()
    assert table.schema.field("shape").type == pa.list_(pa.int64())
    assert table.schema.field("numel").type == pa.int64()
    assert table.schema.field("kept").type == pa.int64()
    assert table.schema.field("bits").type == pa.binary()
    rows = table.to_pylist()
    assert [r["name"] for r in rows] == ["fc1.weight", "fc2.weight"]
    for row, tensor in zip(rows, mask.values()):
        assert row["shape"] == list(tensor.shape)
        assert row["numel"] == tensor.numel() and row["kept"] == int(tensor.sum())
        assert len(row["bits"]) == math.ceil(row["numel"] / 8)
        # The unpacking recipe from the module docstring, with numpy only.
        unpacked = np.unpackbits(np.frombuffer(row["bits"], "uint8"), count=row["numel"]).reshape(row["shape"])
        assert np.array_equal(unpacked.astype(bool), tensor.numpy())
    metadata = pq.ParquetFile(path).metadata
    assert metadata.row_group(0).column(4).compression == "ZSTD"


def test_size_of_a_million_weight_mask() -> None:
    n = 1_000_000
    sizes = {}
    for sparsity in (0.5, 0.9, 0.99):
        data = encode_mask({"w": random_mask((1000, 1000), 1 - sparsity, seed=3)})
        sizes[sparsity] = len(data)
        print(f"sparsity {sparsity:.0%}: {len(data)} bytes, {len(data) / n:.4f} bytes/weight, "
              f"{8 * len(data) / n:.3f} bits/weight")
    assert sizes[0.9] <= n / 8 + 4096
    assert sizes[0.5] <= n / 8 + 4096  # random bits do not compress, but packing bounds them
    assert sizes[0.99] < sizes[0.9] < sizes[0.5]


def _table(**overrides: list) -> bytes:
    columns = {"name": ["a"], "shape": [[2, 5]], "numel": [10], "kept": [3], "bits": [bytes([0b11100000, 0])]}
    columns.update(overrides)
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


def test_a_consistent_foreign_table_decodes() -> None:
    decoded = decode_mask(_table())
    assert decoded["a"].tolist() == [[True, True, True, False, False], [False] * 5]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"numel": [11]}, "product of shape"),
        ({"bits": [bytes([0b11100000])]}, "bytes of bits"),
        ({"kept": [4]}, "bits set"),
        ({"bits": [bytes([0b11100000, 0b00000001])]}, "padding"),
        ({"shape": [[2, -5]], "numel": [-10]}, "product of shape"),
        ({"name": ["a", "a"], "shape": [[2, 5]] * 2, "numel": [10] * 2, "kept": [3] * 2,
          "bits": [bytes([0b11100000, 0])] * 2}, "twice"),
        ({"kept": ["3"]}, "column 'kept'"),
    ],
)
def test_inconsistent_rows_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_mask(_table(**overrides))


def test_missing_column_and_garbage_are_rejected() -> None:
    sink = io.BytesIO()
    pq.write_table(pa.table({"name": ["a"], "numel": [1]}), sink)
    with pytest.raises(ValueError, match="lacks column"):
        decode_mask(sink.getvalue())
    with pytest.raises(ValueError, match="not a mask"):
        decode_mask(b"PAR1 certainly not parquet")
    data = encode_mask({"a": random_mask((100,), 0.5)})
    with pytest.raises(ValueError):
        decode_mask(data[: len(data) // 2])


def test_non_bool_masks_are_refused() -> None:
    with pytest.raises(TypeError, match="bool"):
        encode_mask({"a": torch.ones(3)})


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]
)
def test_weights_round_trip_bit_exact(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(17, 5, generator=generator) * 1e3
    state = {
        "a.weight": values.to(dtype),
        "a.bias": values[0].to(dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
        "scalar": values[0, 0].to(dtype),
        "transposed": values.to(dtype).t(),
    }
    decoded = decode_weights(encode_weights(state))
    assert set(decoded) == set(state)
    for name, tensor in state.items():
        assert decoded[name].dtype == dtype and decoded[name].shape == tensor.shape
        assert decoded[name].view(-1).view(torch.uint8).tolist() == tensor.contiguous().view(-1).view(torch.uint8).tolist()


def test_special_float_values_and_tied_weights_round_trip() -> None:
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    shared = torch.randn(4, 4)
    state = {"special": special, "embed": shared, "head": shared}  # tied: one storage, two names
    decoded = decode_weights(encode_weights(state))
    assert decoded["special"].view(torch.int32).tolist() == special.view(torch.int32).tolist()
    assert torch.equal(decoded["embed"], shared) and torch.equal(decoded["head"], shared)


def test_weights_decoding_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="safetensors"):
        decode_weights(b"\x00" * 40)


def test_manifest_checksum_detects_any_change() -> None:
    body = {"key": "k", "metrics": {"val_accuracy": 0.6512, "loss": float("nan")}, "files": {}}
    data = encode_manifest(body)
    decoded = decode_manifest(data)
    assert decoded["metrics"]["val_accuracy"] == 0.6512 and math.isnan(decoded["metrics"]["loss"])
    with pytest.raises(ValueError, match="checksum"):
        decode_manifest(data.replace(b"0.6512", b"0.9512"))
    with pytest.raises(ValueError, match="not a manifest"):
        decode_manifest(data[:-10])


def test_pruned_weights_cost_their_non_zeros_and_decode_bit_exact() -> None:
    """Issue 23: a 90 %-sparse round's weights take at most 0.25x the dense bytes, still safetensors."""
    import safetensors.torch

    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) for name, shape in
             {"hidden.0.weight": (300, 784), "hidden.0.bias": (300,), "hidden.1.weight": (100, 300),
              "hidden.1.bias": (100,), "output.weight": (10, 100), "output.bias": (10,)}.items()}
    for name in ("hidden.0.weight", "hidden.1.weight", "output.weight"):  # as training masks: -0.0 where w < 0
        state[name] = state[name] * (torch.rand(state[name].shape, generator=generator) >= 0.9)
    assert torch.signbit(state["hidden.1.weight"][state["hidden.1.weight"] == 0]).any()
    state["hidden.0.weight"][0, :3] = torch.tensor([-0.0, float("nan"), float("inf")])
    data = encode_weights(state)
    dense = len(encode_weights({k: v + 1000.0 for k, v in state.items()}))  # same shapes, no zeros: stored dense
    assert len(data) <= 0.25 * dense, (len(data), dense)
    decoded = decode_weights(data)
    assert list(decoded) == sorted(state) or set(decoded) == set(state)
    for name, tensor in state.items():
        assert decoded[name].shape == tensor.shape
        assert decoded[name].view(torch.int32).tolist() == tensor.view(torch.int32).tolist(), name
    assert torch.count_nonzero(decoded["hidden.1.weight"][state["hidden.1.weight"] == 0]) == 0
    parts = safetensors.torch.load(data)  # any safetensors reader: values and bits, the bias as it is
    assert parts["hidden.0.weight::bits"].dtype == torch.uint8 and "hidden.0.bias" in parts
    assert encode_weights(dict(reversed(list(state.items())))) == data  # deterministic: order and all


@pytest.mark.parametrize("damage", ["values", "bits", "shape"])
def test_inconsistent_sparse_weights_are_refused(damage: str) -> None:
    import json as json_module

    import safetensors.torch

    weight = torch.zeros(64, 64)
    weight[::7, ::5] = 1.5
    parts = safetensors.torch.load(encode_weights({"w": weight}))
    metadata = {"lth_sparse": json_module.dumps({"w": [64, 64]})}
    if damage == "values":
        parts["w::values"] = parts["w::values"][:-1]
    elif damage == "bits":
        parts["w::bits"] = parts["w::bits"][:-1]
    else:
        metadata = {"lth_sparse": json_module.dumps({"w": [64, 65]})}
    with pytest.raises(ValueError, match="sparse weight 'w'"):
        decode_weights(safetensors.torch.save(parts, metadata=metadata))
