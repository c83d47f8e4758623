"""The papers' architectures in plain torch: built by lth-search and by a served ticket alike.

This file imports nothing but torch, so tracking/registry.py bundles it with the
registered model (`code_paths`) and `models:/NAME@best` rebuilds its network where
lth-search is not installed. `engine/models.py` builds its models from the same code
and adds what training needs (seeded initialisation, layer groups, config errors).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_CONV_PLANS: dict[str, tuple[list[int | str], list[int]]] = {
    # Frankle & Carbin 2019, Figure 2: 3x3 convs (pad 1) with max pools, then fc layers.
    "conv2": ([64, 64, "M"], [256, 256]),
    "conv4": ([64, 64, "M", 128, 128, "M"], [256, 256]),
    "conv6": ([64, 64, "M", 128, 128, "M", 256, 256, "M"], [256, 256]),
}
_VGG16_PLAN: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


# Architectures ------------------------------------------------------------------------------
class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input (LeNet-300-100 is widths [300, 100])."""

    def __init__(self, in_features: int, widths: list[int], num_classes: int) -> None:
        super().__init__()
        sizes = [in_features, *widths]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.output = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.output(x)


def _pool() -> nn.MaxPool2d:
    """2x2 max pool that rounds up: identical to the usual pool on CIFAR's power-of-two
    sizes, but never shrinks a small image (8x8 digits) to nothing before the last pool."""
    return nn.MaxPool2d(2, ceil_mode=True)


def _ceil_pools(size: int, pools: int) -> int:
    for _ in range(pools):
        size = -(-size // 2)
    return size


def _conv_stack(channels: int, plan: list[int | str], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in plan:
        if item == "M":
            layers.append(_pool())
            continue
        layers.append(nn.Conv2d(channels, int(item), 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(item)))
        layers.append(nn.ReLU())
        channels = int(item)
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Conv-2/4/6 of Frankle & Carbin 2019: conv blocks, then a ReLU MLP head."""

    def __init__(self, input_shape: tuple[int, ...], plan: list[int | str], fc: list[int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = _conv_stack(channels, plan, batch_norm=False)
        last = [c for c in plan if c != "M"][-1]
        flat = int(last) * _ceil_pools(height, plan.count("M")) * _ceil_pools(width, plan.count("M"))
        self.head = MLP(flat, fc, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """He et al.'s basic block; a 1x1 conv + BN projection (option B) when the shape changes."""

    def __init__(self, f_in: int, f_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or f_in != f_out:
            self.shortcut = nn.Sequential(nn.Conv2d(f_in, f_out, 1, stride=stride, bias=False), nn.BatchNorm2d(f_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016, open_lth `cifar_resnet_20`): 3 stages of 3 blocks."""

    def __init__(self, channels: int, width: int, num_classes: int, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        f_in = width
        for stage, f_out in enumerate((width, 2 * width, 4 * width)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(f_in, f_out, stride))
                f_in = f_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


class VGG(nn.Module):
    """CIFAR VGG-16 as in open_lth: 13 3x3 convs, global average pool, one Linear output."""

    def __init__(self, channels: int, plan: list[int | str], num_classes: int, batch_norm: bool) -> None:
        super().__init__()
        self.features = _conv_stack(channels, plan, batch_norm)
        self.fc = nn.Linear(int([c for c in plan if c != "M"][-1]), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class TransformerClassifier(nn.Module):
    """A pre-norm Transformer encoder over tokens, sequence points or image patches; mean pooling; a linear head.

    The input decides what a token is: integer ids (`vocab_size` > 0) are looked up in an
    `nn.Embedding`; a sequence (T,) or (T, F) is cut into runs of `patch` points, an image
    (C, H, W) into `patch` x `patch` squares (a ViT), each projected by one `nn.Linear`.
    A learned position embedding is added, then `layers` `nn.TransformerEncoderLayer`s
    (pre-norm, GELU, no dropout: dropout would draw from the global RNG and break "the
    batch at step t is a function of (seed, t)"), a final LayerNorm, the mean over tokens
    and `output`. Padding tokens are ordinary tokens with a learned embedding: the model
    needs no pad id, and every layer stays a plain function of its input (vmap-able).

    Names follow torch's layers, so a ticket's masks are `layers.0.self_attn.in_proj_weight`
    (Q, K, V in one tensor), `layers.0.self_attn.out_proj.weight`, `layers.0.linear1.weight`,
    `embed.weight` and `output.weight`.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, d_model: int = 64, heads: int = 4,
                 layers: int = 2, ff_width: int = 128, patch: int = 1, vocab_size: int = 0) -> None:
        super().__init__()
        self.input_shape, self.patch, self.tokens_in = tuple(input_shape), int(patch), vocab_size > 0
        if self.tokens_in:
            tokens, self.embed = input_shape[0], nn.Embedding(vocab_size, d_model)
        elif len(input_shape) == 3:
            channels, height, width = input_shape
            tokens = (height // patch) * (width // patch)
            self.embed = nn.Linear(channels * patch * patch, d_model)
        else:
            features = input_shape[1] if len(input_shape) == 2 else 1
            tokens = input_shape[0] // patch
            self.embed = nn.Linear(features * patch, d_model)
        self.position = nn.Parameter(torch.zeros(1, tokens, d_model))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, ff_width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.output = nn.Linear(d_model, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, tokens, d_model) before the position embedding."""
        if self.tokens_in:
            return self.embed(x.long())
        p, n = self.patch, x.shape[0]
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), -1)
        else:
            x = x.reshape(n, self.input_shape[0] // p, -1)
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.position
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h).mean(dim=1))


# Dispatch -----------------------------------------------------------------------------------
NAMES = ("mlp", "lenet_300_100", "conv2", "conv4", "conv6", "resnet20", "vgg16", "transformer", "vit")
"""The built-in models; any other `model.name` is a plug-in (see engine/plugins.py)."""
IMAGE_MODELS = ("conv2", "conv4", "conv6", "resnet20", "vgg16", "vit")
"""Models that need (C, H, W) inputs."""
TRANSFORMER_OPTIONS = ("d_model", "heads", "layers", "ff_width", "patch", "vocab_size")
"""The options of `transformer` and `vit` (the `model` section's fields of the same names)."""


def build_architecture(name: str, input_shape: tuple[int, ...], num_classes: int, widths: list[int] = (100, 100),
                       width: int = 16, batch_norm: bool = True, plan: list[int | str] | None = None,
                       fc: list[int] | None = None, **transformer: int) -> nn.Module:
    """The built-in model `name` (uninitialised weights: load a state dict or initialise it).

    `plan` and `fc` give a Conv-2/4/6 other channel and fc widths (a channel-pruned ticket
    exported as a smaller dense network, portable/structured.py); None keeps the paper's.

    `transformer` holds TRANSFORMER_OPTIONS for `transformer` / `vit` (others ignore them).
    """
    if name in ("transformer", "vit"):
        options = {k: int(v) for k, v in transformer.items() if k in TRANSFORMER_OPTIONS}
        if name == "vit":
            options["vocab_size"] = 0
        return TransformerClassifier(tuple(input_shape), num_classes, **options)
    if name in ("mlp", "lenet_300_100"):
        sizes = [300, 100] if name == "lenet_300_100" else list(widths)
        return MLP(math.prod(input_shape), sizes, num_classes)
    if name in _CONV_PLANS:
        paper_plan, paper_fc = _CONV_PLANS[name]
        return ConvNet(tuple(input_shape), list(plan or paper_plan), list(paper_fc if fc is None else fc), num_classes)
    if name == "resnet20":
        return CifarResNet(input_shape[0], width, num_classes)
    if name == "vgg16":
        return VGG(input_shape[0], _VGG16_PLAN, num_classes, batch_norm)
    raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(NAMES)}")
