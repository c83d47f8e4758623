"""The served ticket: MLflow's `loader_module` for `models:/NAME@best`, without pickles.

MLflow's usual Python models are cloudpickled objects. This model uses pyfunc's
`loader_module` workflow instead: the model folder holds plain files and MLflow calls
`_load_pyfunc(data_path)`, which reads

- `model.json`: how to rebuild the network (a built-in architecture and its options, or
  a plug-in factory `package.module:factory` whose module is bundled beside this one),
  the input shape, the classes and the normalisation (mean, std) of the training split;
- `weights.safetensors`: the trained sparse network in the form measured fastest for its
  shapes on the logging machine's device type (`layers` in `model.json`: CSR/BSR per layer,
  or none: dense; see sparse.py and export.py); a model logged before forms existed has
  `trained.safetensors` (dense, pruned entries exactly zero) instead.

`predict` takes raw inputs (as the data set's files hold them), standardises them the
way training did, and returns class ids. The safetensors files are read here with a
few lines of code, because the `safetensors` package is a dependency of neither torch
nor mlflow, and this model must load where only those two are installed.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import build_architecture
from .sparse import load_sparse

SPEC_FILE = "model.json"
WEIGHTS_FILE = "trained.safetensors"
FORM_WEIGHTS = "weights.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file: 8-byte little-endian header length, JSON header, raw little-endian data."""
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def build_network(spec: dict[str, Any]) -> nn.Module:
    """The untrained network `spec` describes (see `model.json` in the module docstring)."""
    shape, classes = tuple(spec["input_shape"]), int(spec["num_classes"])
    factory = spec.get("factory")
    if factory:
        module_name, _, attribute = factory.partition(":")
        value: Any = import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
        return value(shape, classes)
    return build_architecture(spec["architecture"], shape, classes, **spec.get("options", {}))


class TicketModel:
    """What `mlflow.pyfunc.load_model` wraps: predict() gives class ids, get_raw_model() the module."""

    def __init__(self, spec: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        self.spec = spec
        self.input_shape = tuple(spec["input_shape"])
        self.model = load_sparse(build_network(spec), spec.get("layers", {}), weights).eval()
        norm = spec.get("normalization")
        self.mean = None if norm is None else torch.tensor(norm["mean"], dtype=torch.float32)
        self.std = None if norm is None else torch.tensor(norm["std"], dtype=torch.float32)

    def standardise(self, model_input: Any) -> torch.Tensor:
        """Raw inputs as the network saw them in training: float32, minus mean, over std."""
        if self.spec.get("options", {}).get("vocab_size"):  # token ids: looked up, never standardised
            return torch.as_tensor(np.asarray(model_input, dtype=np.int64)).reshape(-1, *self.input_shape)
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, *self.input_shape)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        return self.model(self.standardise(model_input)).argmax(dim=1).numpy()

    def get_raw_model(self) -> nn.Module:
        """The trained sparse nn.Module (it takes standardised inputs; see `standardise`)."""
        return self.model


def _load_pyfunc(data_path: str) -> TicketModel:
    """MLflow's entry point for `loader_module` models."""
    folder = Path(data_path)
    spec = json.loads((folder / SPEC_FILE).read_text())
    formed = folder / FORM_WEIGHTS
    return TicketModel(spec, read_safetensors(formed if formed.exists() else folder / WEIGHTS_FILE))
