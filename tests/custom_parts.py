"""A researcher's own model and data set, as `package.module:factory` targets (see test_plugins.py).

Plain torch and numpy: a served ticket of this model bundles this file, so it must load
where neither pytest nor lth-search is installed. Its factories carry the plug-in mark
(`@lth_search.plugin`, engine/plugins.py) so a config may name them; where lth-search
is missing the mark is not needed, and the decorator falls back to doing nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    from lth_search import plugin
except ImportError:  # a served ticket, where lth-search is not installed: nothing to mark for
    def plugin(factory):  # type: ignore[no-redef]
        return factory


class TinyConv(nn.Module):
    """A 1-D conv feature layer, a hidden linear layer and an output layer."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, length = input_shape
        self.features = nn.Sequential(nn.Conv1d(channels, 8, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2))
        self.hidden = nn.Linear(8 * (length // 2), 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.features(x).flatten(1))))


@plugin
def tiny_conv(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return TinyConv(input_shape, num_classes)


@plugin
def wave_data(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three classes of noisy sine waves (frequency = class), 600 train / 200 test, shape (1, 24)."""
    rng = np.random.default_rng(7)
    t = np.linspace(0, 2 * np.pi, 24)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        phase = rng.uniform(0, 2 * np.pi, (n, 1))
        x = 3.0 * np.sin((y[:, None] + 1) * t + phase) + 5.0 + rng.normal(0, 1.5, (n, 24))
        return x[:, None, :].astype(np.float32), y

    return (*draw(600), *draw(200))


@plugin
def nan_wave_data(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`wave_data` with a NaN in every 50th training example (some land in the training split
    whatever the validation carve): every lineage's loss turns NaN."""
    x, y, x_test, y_test = wave_data(root)
    x[::50, 0, 0] = np.nan
    return x, y, x_test, y_test


def unmarked_conv(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The same model without the mark: a config may not name it."""
    return TinyConv(input_shape, num_classes)


@plugin
def broken_model(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    raise RuntimeError("this factory is broken")


@plugin
def wide_conv(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Three logits too many."""
    return TinyConv(input_shape, num_classes + 3)


@plugin
def stray_label_data(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """wave_data with one training label of 99."""
    x, y, x_test, y_test = wave_data(root)
    y[5] = 99
    return x, y, x_test, y_test


def delete_root(root: Path) -> None:
    """What a hostile shared config would name: unmarked, so it must never be called."""
    Path(root).unlink()
