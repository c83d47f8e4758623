"""Data set registry: standard files in, seeded float32/int64 device tensors out.

Text data sets (`text`, `text_lm`: engine/text_data.py) come out as int64 token ids,
never normalised; everything else as float32.

Every data set is read from files a researcher already has (or, for MNIST-1D, built
offline and cached), split into train / val / test with a seeded validation carve, and
fingerprinted, so a stage key names the exact examples a model saw. Nothing here is
unpickled without a whitelist: CIFAR-10 batches go through a restricted unpickler.
Any other `data.name` is a plug-in (engine/plugins.py) returning the same four arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lth_search.config import DataConfig
from lth_search.config.data_section import TEXT_DATA
from lth_search.engine.builtin_data import Raw, read_cifar10, read_digits, read_idx_set, read_mnist1d
from lth_search.engine.text_data import read_text
from lth_search.errors import ConfigError, DataError, first_line
from lth_search.engine.plugins import DATA_GROUP, resolve


# Containers ------------------------------------------------------------------------------
@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str
    normalization: tuple[np.ndarray, np.ndarray] | None = None
    """(mean, std) the raw inputs were standardised with (None: data.normalize is off); a
    served model applies them to raw inputs."""
    task: str = "classification"
    """"classification" (y: a class per example) or "causal_lm" (y: the next token per position,
    text_data.IGNORE where there is none; `num_classes` is then the vocabulary)."""
    vocab_size: int = 0
    """Token-id inputs: the tokenizer's vocabulary (0: float inputs)."""
    pad_id: int = 0

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy on `device`; the fingerprint names content, so it is kept."""
        moved = {k: getattr(self, k).to(device) for k in ("train", "val", "test")}
        return dataclasses.replace(self, **moved)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (drop_last), at least 1 so 'Nep' lengths never resolve to 0."""
        return max(1, len(self.train) // batch_size)


# Devices and seeds -----------------------------------------------------------------------
def _count(kind: str) -> int:
    """Usable devices of `kind`; 0 when torch lacks the backend or its driver is broken."""
    try:
        if kind == "mps":
            return int(torch.backends.mps.is_available())
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError, AttributeError):
        return 0


def resolve_device(name: str) -> torch.device:
    """Turn `train.device` into a device, failing with a config error rather than deep in torch."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if _count("cuda") else "cpu")
    kind, _, index = name.partition(":")
    if kind in ("cuda", "mps") and (kind == "cuda" or not index):
        count = _count(kind)
        if not count:
            raise ConfigError(f"train.device: {name} requested but {kind.upper()} is not available")
        if index and (not index.isdigit() or int(index) >= count):
            raise ConfigError(f"train.device: {name} requested but only {count} CUDA device(s) exist")
        return torch.device(name)
    raise ConfigError(f"train.device: must be auto, cpu, cuda or cuda:N, got {name!r}")


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from named parts: unlike seed*K+e, distinct inputs never collide by design."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _randperm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class BatchOrder:
    """Seeded batch order: the batch at iteration `step` is a pure function of (seed, step).

    A pruning round retrains from rewind step k and must see exactly the batches the
    dense run saw at steps k..T, so any step is reachable in O(one permutation) without
    replaying earlier ones. Only the current epoch's permutation is cached.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu") -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"BatchOrder needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.seed, self.device = n, seed, torch.device(device)
        self.batch_size = min(batch_size, n)  # a train split smaller than a batch is one batch
        self.steps_per_epoch = max(1, n // batch_size)
        self._epoch: int | None = None
        self._perm = torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._perm = _randperm(self.n, _derive_seed("batch", self.seed, epoch)).to(self.device)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]


# Registry and assembly -------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    read: Callable[[Path], Raw]
    input_shape: tuple[int, ...]
    num_classes: int


_REGISTRY = {
    "mnist1d": _Spec(read_mnist1d, (40,), 10),
    "digits": _Spec(read_digits, (1, 8, 8), 10),
    "mnist": _Spec(partial(read_idx_set, name="mnist"), (1, 28, 28), 10),
    "fashion_mnist": _Spec(partial(read_idx_set, name="fashion_mnist"), (1, 28, 28), 10),
    "cifar10": _Spec(read_cifar10, (3, 32, 32), 10),
}


def _check_labels(name: str, num_classes: int, labels: np.ndarray) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{name}: labels outside 0..{num_classes - 1} (found {labels.min()}..{labels.max()})")


def _fingerprint(name: str, normalize: bool, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """sha256 over the raw split bytes (native dtype), shapes, name and the normalize flag.

    Hashing before normalisation keeps the key free of float summation order, so nodes
    with different CPUs agree on it; normalisation is a function of the hashed content.
    """
    h = hashlib.sha256(f"lth-data-v1:{name}:normalize={normalize}".encode())
    for split, (x, y) in splits.items():
        h.update(f"|{split}:{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).data)
        h.update(np.ascontiguousarray(y, dtype="<i8").data)
    return h.hexdigest()


def _normalizer(x_train: np.ndarray, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std for images, one global mean/std for 1-D signals (float32)."""
    axes = (0, 2, 3) if image else None
    shape = (1, -1, 1, 1) if image else ()
    mean = x_train.mean(axis=axes, dtype=np.float64).reshape(shape)
    std = x_train.std(axis=axes, dtype=np.float64).reshape(shape)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _tensors(x: np.ndarray, y: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None, tokens: bool = False) -> Split:
    if tokens:  # token ids stay integers: an embedding looks them up
        return Split(torch.from_numpy(np.array(x, dtype=np.int64)), torch.from_numpy(np.asarray(y, dtype=np.int64)))
    xf = np.array(x, dtype=np.float32)  # a fresh, writable copy
    if stats is not None:
        xf -= stats[0]
        xf /= stats[1]
    return Split(torch.from_numpy(xf), torch.from_numpy(np.asarray(y, dtype=np.int64)))


def _plugin_spec(name: str) -> _Spec:
    factory = resolve("data.name", "data set", name, DATA_GROUP, tuple(_REGISTRY))

    def read(root: Path) -> Raw:
        try:
            arrays = tuple(np.asarray(a) for a in factory(root))
        except Exception as error:  # noqa: BLE001 - the user's code failed on the user's data: a user error
            raise DataError(f"data.name: {name} failed ({type(error).__name__}: {first_line(error)})") from None
        if len(arrays) != 4 or arrays[0].ndim < 2 or len(arrays[0]) != len(arrays[1]) \
                or len(arrays[2]) != len(arrays[3]) or arrays[0].shape[1:] != arrays[2].shape[1:]:
            raise DataError(f"data.name: {name} must return (x_train, y_train, x_test, y_test) with matching "
                            f"lengths and example shapes, got shapes {[a.shape for a in arrays]}")
        _check_plugin_labels(name, arrays[1], arrays[3])
        return arrays  # type: ignore[return-value]

    return _Spec(read, (), 0)


def _check_plugin_labels(name: str, y_train: np.ndarray, y_test: np.ndarray) -> None:
    """A plug-in's classes are its labels: whole numbers 0..C-1, each one seen in training.

    The number of classes is read off the labels, so a stray label (99 among 0..9) would
    silently make a 100-class problem whose 90 classes never occur.
    """
    labels = np.concatenate([np.ravel(y_train), np.ravel(y_test)])
    if not len(labels):
        return
    if labels.dtype.kind not in "iub" and not (labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
        raise DataError(f"data.name: {name} returned labels of type {labels.dtype}; labels must be class ids 0..C-1")
    if labels.min() < 0:
        raise DataError(f"data.name: {name} returned label {labels.min():g}; labels must be class ids 0..C-1")
    classes = int(labels.max()) + 1
    missing = np.setdiff1d(np.arange(classes), np.ravel(y_train).astype(np.int64))
    if len(missing):
        shown = ", ".join(str(int(c)) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"data.name: {name} returns labels up to {classes - 1}, but class(es) {shown} ({len(missing)} of {classes}) "
            "never occur in the training split; labels must be 0..C-1 with every class present"
        )


def read_raw(cfg: DataConfig) -> tuple[Raw, tuple[int, ...], int]:
    """The data set's raw arrays (before the val carve and normalisation), its input shape and classes."""
    if cfg.name in TEXT_DATA:
        text = read_text(cfg)
        return text.raw, text.input_shape, text.num_classes
    spec = _REGISTRY.get(cfg.name) or _plugin_spec(cfg.name)
    root = Path(cfg.root).expanduser().resolve()
    raw = read_mnist1d(root, cfg.mnist1d_samples) if cfg.name == "mnist1d" else spec.read(root)
    if spec.num_classes:
        return raw, spec.input_shape, spec.num_classes
    labels = np.concatenate([raw[1], raw[3]])
    return raw, tuple(int(d) for d in raw[0].shape[1:]), int(labels.max()) + 1 if len(labels) else 0


def data_signature(cfg: DataConfig) -> tuple[tuple[int, ...], int]:
    """(input shape, classes): from the registry, or by reading a plug-in's arrays."""
    spec = _REGISTRY.get(cfg.name)
    if spec is not None:
        return spec.input_shape, spec.num_classes
    _, shape, classes = read_raw(cfg)
    return shape, classes


def load_dataset(cfg: DataConfig, seed: int, device: torch.device | str = "cpu") -> Dataset:
    """Read `cfg.name`, carve `cfg.val_size` seeded validation examples off train, normalise.

    The carve depends only on (data, seed), so every trial of a search holds out the same
    examples; test is the data set's own test split and never changes.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    text = read_text(cfg) if cfg.name in TEXT_DATA else None
    (x, y, x_test, y_test), input_shape, num_classes = (
        (text.raw, text.input_shape, text.num_classes) if text is not None else read_raw(cfg))
    for labels in (y, y_test):
        if text is None or text.task == "classification":
            _check_labels(cfg.name, num_classes, labels)
    if cfg.val_size >= len(y):
        raise DataError(f"data.val_size: {cfg.val_size} must be < {len(y)} training examples of {cfg.name}")
    perm = _randperm(len(y), _derive_seed("val", seed)).numpy()
    val_idx, train_idx = np.sort(perm[: cfg.val_size]), np.sort(perm[cfg.val_size :])
    raw = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": (x_test, y_test)}
    stats = _normalizer(raw["train"][0], image=len(input_shape) == 3) if cfg.normalize and text is None else None
    splits = {k: _tensors(xs, ys, stats, tokens=text is not None).to(device) for k, (xs, ys) in raw.items()}
    extra = {} if text is None else {"task": text.task, "vocab_size": text.vocab_size, "pad_id": text.pad_id}
    return Dataset(
        name=cfg.name,
        num_classes=num_classes,
        input_shape=input_shape,
        fingerprint=_fingerprint(cfg.name, cfg.normalize and text is None, raw),
        normalization=stats,
        **splits,
        **extra,
    )
