"""A trained ticket written in the form it runs fastest in, with a loader that needs torch alone.

`lth-search best --out DIR --format dense|csr|bsr|structured` and the registered MLflow
model write these files (no pickles: JSON for the spec, safetensors for tensors):

- `model.json`: the network's spec (ticket_model.py) plus `format` and `layers`, the sparse
  form of each layer (sparse.py `layer_specs`); for `structured`, the smaller network's
  widths (structured.py);
- `weights.safetensors`: the tensors in that form (a CSR layer `L`: `L.weight.crow_indices`,
  `L.weight.col_indices` int32, `L.weight.values`);
- `lth_portable/` (this package) and `load_ticket.py`, so `python -c "import load_ticket;
  net = load_ticket.load()"` in the folder gives the network where lth-search is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .sparse import layer_specs, load_sparse, sparsify
from .structured import shrink
from .ticket_model import build_network, read_safetensors

EXPORT_FORMATS = ("dense", "csr", "bsr", "structured")
SPEC_FILE = "model.json"
FORM_WEIGHTS = "weights.safetensors"
LOADER = "load_ticket.py"
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_LOADER_TEXT = '''"""Load the exported ticket of this folder with torch alone (written by lth-search)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lth_portable.export import load_export  # noqa: E402


def load():
    """The trained network in its exported form (eval mode); it takes standardised inputs
    (model.json `normalization`: (x - mean) / std of raw inputs)."""
    return load_export(HERE)
'''


def write_safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors format (8-byte header length, JSON header, raw little-endian data), names
    sorted, so equal tensors give equal bytes (the safetensors package is not a torch dependency)."""
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def form_of(model: nn.Module, spec: dict[str, Any], fmt: str | dict[str, str]) -> tuple[nn.Module, dict[str, Any]]:
    """(model in form `fmt`, its spec): one format for every pruned layer, `structured`, or a
    layer -> format plan (what `sparse.choose_formats` measured fastest)."""
    if fmt == "structured":
        small, small_spec, _ = shrink(model, spec)
        return small, {**small_spec, "format": "structured", "layers": {}}
    if not isinstance(fmt, dict) and fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
    formed = model if fmt == "dense" else sparsify(model, fmt)
    name = fmt if isinstance(fmt, str) else ("dense" if not fmt else "measured")
    return formed, {**spec, "format": name, "layers": layer_specs(formed)}


def write_form(folder: Path, model: nn.Module, spec: dict[str, Any], loader: bool = True) -> None:
    """`model.json`, `weights.safetensors` and (`loader`) the loader and this package, into `folder`."""
    from .sparse import sparse_tensors

    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    (folder / FORM_WEIGHTS).write_bytes(write_safetensors(sparse_tensors(model)))
    if not loader:
        return
    (folder / LOADER).write_text(_LOADER_TEXT)
    shutil.copytree(Path(__file__).resolve().parent, folder / "lth_portable",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)


def write_export(folder: str | Path, spec: dict[str, Any], state: dict[str, torch.Tensor],
                 fmt: str | dict[str, str]) -> Path:
    """Build the network of `spec` with trained `state` and write it in form `fmt` into `folder`."""
    model = build_network(spec)
    model.load_state_dict(state)
    formed, formed_spec = form_of(model.eval(), spec, fmt)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_form(folder, formed, formed_spec)
    return folder


def load_export(folder: str | Path) -> nn.Module:
    """The network a folder of `write_form` holds, in its form, eval mode."""
    folder = Path(folder)
    spec = json.loads((folder / SPEC_FILE).read_text())
    model = build_network(spec)
    return load_sparse(model, spec.get("layers", {}), read_safetensors(folder / FORM_WEIGHTS)).eval()
