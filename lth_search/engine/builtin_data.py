"""The built-in data sets: where each one's files are, how they are read, what a missing one says.

MNIST-1D is built offline by the mnist1d package and cached; digits ships with sklearn;
MNIST, Fashion-MNIST and CIFAR-10 are read from the standard files a researcher already
has (data_files.py parses their formats). Each reader returns the four arrays of `Raw`;
data.py splits, normalises and fingerprints them alike for every set, plug-ins included.
"""

from __future__ import annotations

import os
import random
import tempfile
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np

from lth_search.engine.data_files import read_cifar_batch, read_idx
from lth_search.errors import DataError

Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test; x (n, *shape)


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


def read_mnist1d(root: Path, samples: int = MNIST1D_PUBLISHED) -> Raw:
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
def read_digits(root: Path) -> Raw:
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


def read_idx_set(root: Path, name: str) -> Raw:
    return (*_read_idx_pair(root, name, "train"), *_read_idx_pair(root, name, "t10k"))


# CIFAR-10 python batches -----------------------------------------------------------------
def read_cifar10(root: Path) -> Raw:
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
