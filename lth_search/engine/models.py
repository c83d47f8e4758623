"""The model registry: the papers' architectures, seeded, with their prunable layers named.

Pruning needs to know which tensors it may prune and to which *layer group* each
belongs, because the search splits the pruning rate across groups (conv vs fc vs the
output layer, as Frankle & Carbin prune the output layer at half rate). So every model
built here carries `model.prunable`: parameter name -> group, covering the weights of
conv and linear layers (never biases or batch norm, as in open_lth).

Initialisation is a pure function of the seed: models are allocated on the meta device
(so PyTorch's default initialisers never draw from the global RNG) and then every
parameter and buffer is written from a private `torch.Generator`. Building a model thus
leaves the caller's RNG stream (CPU and CUDA) exactly where it was, and the same seed
gives a bit-identical state dict on any machine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lth_search.config import MODELS, ModelConfig
from lth_search.errors import ConfigError

GROUPS = ("conv", "fc", "output", "shortcut")
"""Layer groups a model here can have; `prune.layer_ratios` keys refer to these."""

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


# Registry -----------------------------------------------------------------------------------
def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        shape = "(" + ",".join(str(s) for s in input_shape) + ("," if len(input_shape) == 1 else "") + ")"
        raise ConfigError(f"model.name: {name} needs image input (C,H,W), data gives {shape}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def _architecture(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    name = cfg.name
    if name in ("mlp", "lenet_300_100"):
        widths = [300, 100] if name == "lenet_300_100" else list(cfg.widths)
        return MLP(math.prod(input_shape), widths, num_classes)
    if name in _CONV_PLANS:
        plan, fc = _CONV_PLANS[name]
        return ConvNet(_image_shape(name, input_shape), plan, fc, num_classes)
    if name == "resnet20":
        return CifarResNet(_image_shape(name, input_shape)[0], cfg.width, num_classes)
    if name == "vgg16":
        return VGG(_image_shape(name, input_shape)[0], _VGG16_PLAN, num_classes, cfg.batch_norm)
    raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(MODELS)}")


def _initialise(model: nn.Module, generator: torch.Generator) -> None:
    """open_lth's initialisation, drawn from `generator` only.

    Conv and linear weights: Kaiming normal (fan_in, ReLU gain), biases zero, as open_lth.
    Batch norm: weight 1, bias 0 (PyTorch's default). open_lth draws BN weights from
    U(0, 1) instead; that shrinks every block's output by a random factor (E[g^2] = 1/3)
    that no rescale at rewind accounts for, while a constant 1 keeps the analysis of
    "rescale the surviving weights to restore the variance" about the weights alone.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.reset_running_stats()
            elif list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
                raise TypeError(f"no initialiser for {type(module).__name__}")


def prunable_groups(model: nn.Module) -> dict[str, str]:
    """Prunable parameter name -> layer group ("conv", "fc", "output", "shortcut").

    Models built here carry the answer as `model.prunable`. For any other module it is
    derived: conv weights are "conv" (1x1 convs inside a `shortcut` are "shortcut"),
    linear weights are "fc", and the last linear layer registered is "output".
    """
    existing = getattr(model, "prunable", None)
    if isinstance(existing, dict):
        return dict(existing)
    groups: dict[str, str] = {}
    last_linear = None
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv2d):
            groups[f"{prefix}weight"] = "shortcut" if "shortcut" in name.split(".") else "conv"
        elif isinstance(module, nn.Linear):
            groups[f"{prefix}weight"] = "fc"
            last_linear = f"{prefix}weight"
    if last_linear is not None:
        groups[last_linear] = "output"
    return groups


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build `cfg.name` for inputs of `input_shape` (no batch axis), seeded by `seed`, on CPU.

    The result has `.prunable` (see `prunable_groups`). Raises ConfigError when the model
    cannot take the data (a conv model on flat features).
    """
    if num_classes < 1:
        raise ConfigError(f"model: need at least one class, data gives {num_classes}")
    input_shape = tuple(int(s) for s in input_shape)
    with torch.device("meta"):
        model = _architecture(cfg, input_shape, num_classes)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(int(seed))
    _initialise(model, generator)
    model.prunable = prunable_groups(model)
    return model

