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
import os
import random
import tempfile
import zlib
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lth_search.config import DataConfig
from lth_search.config.data_section import TEXT_DATA
from lth_search.engine.data_files import read_cifar_batch, read_idx
from lth_search.engine.text_data import read_text
from lth_search.errors import ConfigError, DataError, first_line
from lth_search.engine.plugins import DATA_GROUP, resolve

Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test; x (n, *shape)


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


# MNIST-1D ----------------------------------------------------------------------------------
MNIST1D_PUBLISHED = 5000
"""Examples in the published MNIST-1D (4000 train, 1000 test): mnist1d's own default."""


def _mnist1d_build(samples: int = MNIST1D_PUBLISHED) -> Raw:
    """Build MNIST-1D offline. make_dataset reseeds numpy and random globally: undo that.

    The generator makes as many examples as asked (`samples`, split 80/20 into train and
    test as mnist1d does); more examples let the validation split grow without shrinking
    the training set, which is what makes a "matching" verdict less noisy.
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = samples
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temp file then rename, so a concurrent reader sees all or nothing."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # NamedTemporaryFile makes 0600; a shared cache must be readable
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable root only costs the next load a rebuild
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _read_mnist1d(root: Path, samples: int = MNIST1D_PUBLISHED) -> Raw:
    """Load the cached build (~0.1 s) or build and cache it (~3.4 s plus importing matplotlib).

    The cache is named by the mnist1d version, so an upgrade that changes the generator
    builds afresh; any unreadable cache is rebuilt, and writes are atomic so concurrent
    trials never see half a file.
    """
    try:
        version = metadata.version("mnist1d")
    except metadata.PackageNotFoundError:
        raise DataError("mnist1d: the mnist1d package is not installed; pip install mnist1d") from None
    name = "default" if samples == MNIST1D_PUBLISHED else f"{samples}"
    path = root / "mnist1d" / f"mnist1d-{version}-{name}.npz"
    made = samples // 10 * 10  # mnist1d makes samples // 10 examples per class
    train = int(made * 0.8)
    shapes = {"x": (train, 40), "y": (train,), "x_test": (made - train, 40), "y_test": (made - train,)}
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = tuple(npz[k] for k in shapes)
        if all(a.shape == s for a, s in zip(raw, shapes.values())):
            return raw
    except (OSError, ValueError, KeyError, EOFError, zlib.error):
        pass  # missing or corrupt cache: rebuild below
    raw = _mnist1d_build(samples)
    _save_npz_atomic(path, dict(zip(shapes, raw)))
    return raw


# Digits ------------------------------------------------------------------------------------
def _read_digits(root: Path) -> Raw:
    """sklearn's 1797 8x8 digits with a fixed 20 % test split (seed 0): test never moves."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images.reshape(-1, 1, 8, 8), digits.target
    perm = np.random.RandomState(0).permutation(len(y))
    test, train = np.sort(perm[: len(y) // 5]), np.sort(perm[len(y) // 5 :])
    return x[train], y[train], x[test], y[test]


# MNIST / Fashion-MNIST IDX -------------------------------------------------------------
_TV = "torchvision.datasets.{}(data.root, download=True)"
_IDX_SOURCES = {  # name: (folders: ours first, then torchvision's; label; where to get the files)
    "mnist": (("mnist", "MNIST/raw"), "MNIST", "yann.lecun.com/exdb/mnist or " + _TV.format("MNIST")),
    "fashion_mnist": (
        ("fashion_mnist", "FashionMNIST/raw"), "Fashion-MNIST",
        "github.com/zalandoresearch/fashion-mnist or " + _TV.format("FashionMNIST"),
    ),
}


def _find_idx(root: Path, name: str, stem: str) -> Path:
    dirs, label, source = _IDX_SOURCES[name]
    for folder in dirs:
        for suffix in ("", ".gz"):
            if (root / folder / (stem + suffix)).is_file():
                return root / folder / (stem + suffix)
    raise DataError(
        f"{name}: {root / dirs[0] / stem}(.gz) not found; put the four {label} IDX files there "
        f"(from {source}) or set data.root"
    )


def _read_idx_pair(root: Path, name: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx(root, name, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, name, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected 28x28 images, found {images.shape[1:]}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images.reshape(-1, 1, 28, 28), labels


def _read_idx_set(root: Path, name: str) -> Raw:
    return (*_read_idx_pair(root, name, "train"), *_read_idx_pair(root, name, "t10k"))


# CIFAR-10 python batches -----------------------------------------------------------------
def _read_cifar10(root: Path) -> Raw:
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        if not (folder / name).is_file():
            raise DataError(
                f"cifar10: {folder / name} not found; extract "
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into data.root "
                "(or torchvision.datasets.CIFAR10(data.root, download=True)) or set data.root"
            )
    parts = [read_cifar_batch(folder / name) for name in names]
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return x_train, y_train, parts[5][0], parts[5][1]


# Registry and assembly -------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    read: Callable[[Path], Raw]
    input_shape: tuple[int, ...]
    num_classes: int


_REGISTRY = {
    "mnist1d": _Spec(_read_mnist1d, (40,), 10),
    "digits": _Spec(_read_digits, (1, 8, 8), 10),
    "mnist": _Spec(partial(_read_idx_set, name="mnist"), (1, 28, 28), 10),
    "fashion_mnist": _Spec(partial(_read_idx_set, name="fashion_mnist"), (1, 28, 28), 10),
    "cifar10": _Spec(_read_cifar10, (3, 32, 32), 10),
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
    raw = _read_mnist1d(root, cfg.mnist1d_samples) if cfg.name == "mnist1d" else spec.read(root)
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
