"""The model registry: the papers' architectures, seeded, with their prunable layers named.

Pruning needs to know which tensors it may prune and to which *layer group* each
belongs, because the search splits the pruning rate across groups (conv vs fc vs the
output layer, as Frankle & Carbin prune the output layer at half rate). So every model
built here carries `model.prunable`: parameter name -> group, covering the weights of
conv and linear layers (never biases or batch norm, as in open_lth).

Any other `model.name` is a plug-in (engine/plugins.py: an entry point or a
`package.module:factory` import target); its prunable tensors and layer groups are
found by `prunable_groups`, and it is initialised by its own code under a private,
seeded RNG (`torch.random.fork_rng`), so the same two guarantees below hold for it.

Initialisation is a pure function of the seed: models are allocated on the meta device
(so PyTorch's default initialisers never draw from the global RNG) and then every
parameter and buffer is written from a private `torch.Generator`. Building a model thus
leaves the caller's RNG stream (CPU and CUDA) exactly where it was, and the same seed
gives a bit-identical state dict on any machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lth_search.config import ExperimentConfig, ModelConfig

if TYPE_CHECKING:
    from lth_search.engine.data import Dataset
from lth_search.engine.plugins import MODEL_GROUP, resolve
from lth_search.errors import ConfigError, first_line
from lth_search.portable.architectures import IMAGE_MODELS, NAMES, build_architecture

GROUPS = ("conv", "fc", "output", "shortcut")
"""Layer groups a model here can have; `prune.layer_ratios` keys refer to these."""


# Registry -----------------------------------------------------------------------------------
def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        shape = "(" + ",".join(str(s) for s in input_shape) + ("," if len(input_shape) == 1 else "") + ")"
        raise ConfigError(f"model.name: {name} needs image input (C,H,W), data gives {shape}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def _builtin(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    if cfg.name in IMAGE_MODELS:
        _image_shape(cfg.name, input_shape)
    with torch.device("meta"):
        model = build_architecture(cfg.name, input_shape, num_classes, cfg.widths, cfg.width, cfg.batch_norm)
    model = model.to_empty(device="cpu")
    _initialise(model, torch.Generator().manual_seed(int(seed)))
    return model


def _plugin(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A plug-in model, initialised by its own code from a private RNG seeded by `seed`."""
    factory = resolve("model.name", "model", cfg.name, MODEL_GROUP, NAMES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            model = factory(input_shape, num_classes)
        except Exception as error:  # noqa: BLE001 - the user's factory failed: a user error, one line
            raise ConfigError(f"model.name: {cfg.name} failed ({type(error).__name__}: {first_line(error)})") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.name: {cfg.name} returned {type(model).__name__}, not a torch nn.Module")
        model = model.to("cpu")
        _check_output_width(cfg.name, model, input_shape, num_classes)
    return model


def _check_output_width(name: str, model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
    """One forward pass of two zero inputs (eval mode): a plug-in must map them to (2, num_classes) logits.

    Extra logits would train silently (cross-entropy never asks for them); too few fail
    on the first batch with a torch message that names no config key.
    """
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as error:  # noqa: BLE001 - the user's forward pass failed on the data's shape
        raise ConfigError(
            f"model.name: {name} cannot take inputs shaped {tuple(input_shape)} ({type(error).__name__}: "
            f"{first_line(error)})"
        ) from None
    finally:
        model.train(training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise ConfigError(
            f"model.name: {name} returns outputs shaped {shape} for a batch of 2; the data set has "
            f"{num_classes} classes, so (2, {num_classes}) logits are needed"
        )


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
        if isinstance(module, nn.modules.conv._ConvNd):
            groups[f"{prefix}weight"] = "shortcut" if "shortcut" in name.split(".") else "conv"
        elif isinstance(module, nn.Linear):
            groups[f"{prefix}weight"] = "fc"
            last_linear = f"{prefix}weight"
    if last_linear is not None:
        groups[last_linear] = "output"
    return groups


def check_parts(cfg: ExperimentConfig, data: "Dataset | None" = None) -> None:
    """Fail now, before anything is written, when the device, model or data set cannot be had.

    Names are the registries' business (built in, plug-in or import target), so a
    config validates without them; this resolves both, builds the model for the data's
    shape (`data` when loaded already, else the registry's or a plug-in's shape) and
    checks it has the layer groups `prune.layer_ratios` names. Callers run it before they
    open a store, Ray or a tracking run: bad input writes nothing.
    """
    from lth_search.engine.data import data_signature, resolve_device
    from lth_search.engine.pruning import check_layer_groups

    resolve_device(cfg.train.device)
    shape, classes = (data.input_shape, data.num_classes) if data is not None else data_signature(cfg.data)
    model = build_model(cfg.model, shape, classes, cfg.seed)
    check_layer_groups(dict(model.prunable), cfg.prune.layer_ratios)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build `cfg.name` for inputs of `input_shape` (no batch axis), seeded by `seed`, on CPU.

    The result has `.prunable` (see `prunable_groups`). Raises ConfigError when the model
    cannot take the data (a conv model on flat features).
    """
    if num_classes < 1:
        raise ConfigError(f"model: need at least one class, data gives {num_classes}")
    input_shape = tuple(int(s) for s in input_shape)
    build = _builtin if cfg.name in NAMES else _plugin
    model = build(cfg, input_shape, num_classes, seed)
    model.prunable = prunable_groups(model)
    if not model.prunable:
        raise ConfigError(f"model.name: {cfg.name} has no conv or linear layer to prune")
    return model

