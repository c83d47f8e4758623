"""Byte formats of what the stage store keeps: masks as Parquet, weights as safetensors.

Both formats are data-only, so nothing read back from a store (or from MLflow) is ever
unpickled, and both are readable without lth-search.

Mask Parquet file (zstd-compressed), one row per layer, in the mask's layer order:

==========  ===============  ==========================================================
column      Arrow type       meaning
==========  ===============  ==========================================================
``name``    string           layer (parameter) name, e.g. ``"fc1.weight"``
``shape``   list<int64>      the layer's shape; ``[]`` for a scalar
``numel``   int64            number of weights, the product of ``shape``
``kept``    int64            number of True (kept) weights
``bits``    binary           ``numpy.packbits(mask.flatten(), bitorder="big")``: one bit
                             per weight in row-major (C) order, 1 = kept, the last byte
                             zero-padded; ``ceil(numel / 8)`` bytes
==========  ===============  ==========================================================

Unpack a layer anywhere with
``numpy.unpackbits(numpy.frombuffer(bits, "uint8"), count=numel).reshape(shape).astype(bool)``.
Bit-packing stores one bit per weight before compression; zstd then squeezes sparse
masks further (long runs of zero bytes).

Weights: the safetensors format (``safetensors.torch.save`` / ``load``), any dtype. A
tensor that is mostly zeros (a pruned layer's weights) costs its non-zeros: it is stored as
tensors, ``<name>::values`` (its non-zero entries in row-major order, its own dtype),
``<name>::bits`` (uint8, ``numpy.packbits(nonzero.flatten(), bitorder="big")``) and, only
when some zero is ``-0.0`` (training multiplies negative weights by a zero mask), ``<name>::negzero``
(the sign bits of the zero entries, packed the same way, in their row-major order); its shape
goes in the file's ``__metadata__`` under ``lth_sparse`` (canonical JSON: name -> shape).
NaN is a value; decoding is bit-exact. A tensor is stored that way only when it is smaller, a
function of the tensor alone, so equal weights always give equal bytes. Reassemble one with
numpy alone::

    flat = numpy.zeros(prod(shape), dtype); bits = numpy.unpackbits(bits_bytes, count=prod(shape))
    flat[bits.astype(bool)] = values; (then negate the zeros whose negzero bit is set)

At 90 % sparsity a float32 layer costs 0.4 + 0.125 (+ 0.11 with negzero) bytes per weight
instead of 4 (0.13-0.16x).

Manifests: JSON objects (keys in insertion order, NaN allowed) carrying a ``checksum``
field, the sha256 of the compact sorted-key JSON of all other fields, so a flipped digit in a metric
is detected like a flipped bit in a weight.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch

from lth_search.store.content_keys import canonical_json

Mask = dict[str, torch.Tensor]
"""Prunable parameter name -> bool tensor of the parameter's shape (True = kept): the one
mask type of the engine, the store and tickets."""

MASK_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("kept", pa.int64(), nullable=False),
        pa.field("bits", pa.binary(), nullable=False),
    ]
)
_COLUMNS = [field.name for field in MASK_SCHEMA]


def encode_mask(mask: Mask) -> bytes:
    """A mask as Parquet bytes (see the module docstring for the columns)."""
    rows: dict[str, list] = {column: [] for column in _COLUMNS}
    for name, tensor in mask.items():
        if tensor.dtype != torch.bool:
            raise TypeError(f"mask layer {name!r} must be a bool tensor, got {tensor.dtype}")
        flat = tensor.detach().to("cpu").contiguous().view(-1).numpy()
        rows["name"].append(name)
        rows["shape"].append(list(tensor.shape))
        rows["numel"].append(int(flat.size))
        rows["kept"].append(int(np.count_nonzero(flat)))
        rows["bits"].append(np.packbits(flat, bitorder="big").tobytes())
    table = pa.Table.from_pydict(rows, schema=MASK_SCHEMA)
    sink = io.BytesIO()
    # No dictionary or min/max statistics on `bits`: both would only duplicate the payload.
    pq.write_table(
        table,
        sink,
        compression="zstd",
        use_dictionary=["name"],
        write_statistics=["name", "numel", "kept"],
    )
    return sink.getvalue()


def decode_mask(data: bytes) -> Mask:
    """Parquet bytes back to a mask, checking that every row is self-consistent.

    Raises ValueError when the bytes are not a mask file or a row contradicts itself
    (a checksum catches storage corruption; this catches files written by other tools).
    """
    try:
        # Not pq.read_table: its dataset scanner may drop the last reference to `data` on a
        # background thread during interpreter exit, which aborts the process (SIGABRT).
        with pq.ParquetFile(pa.BufferReader(data)) as file:
            table = file.read(use_threads=False)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"not a mask Parquet file: {error}") from None
    _check_schema(table.schema)
    mask: Mask = {}
    for row in table.to_pylist():
        name = row["name"]
        if name in mask:
            raise ValueError(f"mask layer {name!r} appears twice")
        mask[name] = _decode_row(row)
    return mask


def _check_schema(schema: pa.Schema) -> None:
    expected = {
        "name": (pa.string(), pa.large_string()),
        "shape": (pa.list_(pa.int64()), pa.large_list(pa.int64())),
        "numel": (pa.int64(),),
        "kept": (pa.int64(),),
        "bits": (pa.binary(), pa.large_binary()),
    }
    for column, types in expected.items():
        index = schema.get_field_index(column)
        if index < 0:
            raise ValueError(f"mask file lacks column {column!r}")
        if schema.field(index).type not in types:
            raise ValueError(f"mask column {column!r} has type {schema.field(index).type}, expected {types[0]}")


def _decode_row(row: dict) -> torch.Tensor:
    name, shape, numel, kept, bits = (row[c] for c in _COLUMNS)
    if None in (name, shape, numel, kept, bits) or None in shape:
        raise ValueError(f"mask layer {name!r} has a null field")
    if any(d < 0 for d in shape) or numel != math.prod(shape):
        raise ValueError(f"mask layer {name!r}: numel {numel} != product of shape {shape}")
    if len(bits) != (numel + 7) // 8:
        raise ValueError(f"mask layer {name!r}: {len(bits)} bytes of bits for {numel} weights")
    unpacked = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="big")
    flat, padding = unpacked[:numel], unpacked[numel:]
    if padding.any():
        raise ValueError(f"mask layer {name!r}: padding bits after the last weight are set")
    if int(np.count_nonzero(flat)) != kept:
        raise ValueError(f"mask layer {name!r}: kept {kept} != {int(np.count_nonzero(flat))} bits set")
    return torch.from_numpy(flat.astype(np.bool_)).reshape(shape)


SPARSE_METADATA = "lth_sparse"
"""The safetensors metadata key naming the tensors stored as values plus bit mask, with their shapes."""
_VALUES, _BITS, _NEGZERO = "::values", "::bits", "::negzero"
_SUFFIXES = (_VALUES, _BITS, _NEGZERO)


def _sparse_parts(tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """suffix -> part of `tensor` stored sparse (values, bits, maybe negzero) when that is smaller, else None."""
    if tensor.dim() == 0 or tensor.numel() == 0 or tensor.dtype == torch.bool:
        return None
    flat = tensor.view(-1)
    kept = flat != 0  # NaN != 0: a value
    nonzero = int(kept.sum())
    zeros = flat[~kept]
    negative = torch.signbit(zeros) if tensor.is_floating_point() else torch.zeros(0, dtype=torch.bool)
    size = nonzero * tensor.element_size() + (tensor.numel() + 7) // 8
    size += (zeros.numel() + 7) // 8 if bool(negative.any()) else 0
    if size >= tensor.numel() * tensor.element_size():
        return None
    parts = {_VALUES: flat[kept].contiguous(), _BITS: torch.from_numpy(np.packbits(kept.numpy(), bitorder="big"))}
    if bool(negative.any()):
        parts[_NEGZERO] = torch.from_numpy(np.packbits(negative.numpy(), bitorder="big"))
    return parts


def encode_weights(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes; mostly-zero tensors as values plus bit mask (module docstring).

    Tensors are copied to contiguous CPU memory first; tied tensors (shared storage)
    are stored once per name, since safetensors refuses shared storage.
    """
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, list[int]] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} must be a tensor, got {type(tensor).__name__}")
        if any(suffix in name for suffix in _SUFFIXES):
            raise ValueError(f"weight name {name!r} holds a reserved suffix ({', '.join(_SUFFIXES)})")
        tensor = tensor.detach().to("cpu", copy=True).contiguous()
        parts = _sparse_parts(tensor)
        if parts is None:
            tensors[name] = tensor
        else:
            tensors.update({name + suffix: part for suffix, part in parts.items()})
            sparse[name] = list(tensor.shape)
    metadata = {SPARSE_METADATA: canonical_json(sparse)} if sparse else None  # one key: no order to vary
    return safetensors.torch.save(tensors, metadata=metadata)


def decode_weights(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors bytes back to a state dict (CPU tensors), sparse-stored tensors reassembled.

    ValueError when the bytes are not safetensors or a sparse tensor contradicts itself."""
    try:
        tensors = safetensors.torch.load(data)
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
        sparse = json.loads(metadata[SPARSE_METADATA]) if SPARSE_METADATA in metadata else {}
    except Exception as error:  # safetensors raises its own SafetensorError (and others)
        raise ValueError(f"not a safetensors file: {error}") from None
    if not isinstance(sparse, dict):
        raise ValueError(f"metadata {SPARSE_METADATA} is not a JSON object")
    for name, shape in sparse.items():
        tensors[name] = _reassemble(name, shape, tensors.pop(name + _VALUES, None), tensors.pop(name + _BITS, None),
                                    tensors.pop(name + _NEGZERO, None))
    stray = [n for n in tensors if any(suffix in n for suffix in _SUFFIXES)]
    if stray:
        raise ValueError(f"sparse part {stray[0]!r} belongs to no tensor of metadata {SPARSE_METADATA}")
    return tensors


def _unpack(name: str, bits: torch.Tensor, count: int, what: str) -> torch.Tensor:
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (count + 7) // 8:
        raise ValueError(f"sparse weight {name!r}: {bits.numel()} bytes of {what} for {count} entries")
    unpacked = np.unpackbits(bits.numpy(), bitorder="big")
    if unpacked[count:].any():
        raise ValueError(f"sparse weight {name!r}: padding bits of {what} after the last entry are set")
    return torch.from_numpy(unpacked[:count].astype(np.bool_))


def _reassemble(name: str, shape: Any, values: torch.Tensor | None, bits: torch.Tensor | None,
                negzero: torch.Tensor | None) -> torch.Tensor:
    if values is None or bits is None:
        raise ValueError(f"sparse weight {name!r} lacks its values or bits")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"sparse weight {name!r}: bad shape {shape!r}")
    numel = math.prod(shape)
    kept = _unpack(name, bits, numel, "bits")
    if values.dim() != 1 or int(kept.sum()) != values.numel():
        raise ValueError(f"sparse weight {name!r}: {values.numel()} values for {int(kept.sum())} bits set")
    flat = torch.zeros(numel, dtype=values.dtype)
    flat[kept] = values
    if negzero is not None:
        if not values.is_floating_point():
            raise ValueError(f"sparse weight {name!r}: negative zeros in a {values.dtype} tensor")
        zeros = flat[~kept]
        flat[~kept] = torch.where(_unpack(name, negzero, zeros.numel(), "negzero"), -zeros, zeros)
    return flat.reshape(shape)


def encode_manifest(body: dict[str, Any]) -> bytes:
    """Indented JSON of `body` plus its `checksum` (readable by people, verifiable by code)."""
    if "checksum" in body:
        raise ValueError("a manifest body must not carry its own 'checksum' field")
    signed = {**body, "checksum": hashlib.sha256(canonical_json(body, allow_nan=True).encode()).hexdigest()}
    return json.dumps(signed, indent=1, allow_nan=True).encode() + b"\n"  # insertion order, for people


def decode_manifest(data: bytes) -> dict[str, Any]:
    """The manifest body (without `checksum`); ValueError if it is not JSON or the checksum fails."""
    try:
        body = json.loads(data)
        claimed = body.pop("checksum")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError("not a manifest (no JSON object with a checksum)") from None
    if claimed != hashlib.sha256(canonical_json(body, allow_nan=True).encode()).hexdigest():
        raise ValueError("manifest checksum mismatch")
    return body
