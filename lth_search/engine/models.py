"""The model registry: the papers' architectures, seeded, with their prunable layers named.

Pruning needs to know which tensors it may prune and to which *layer group* each
belongs, because the search splits the pruning rate across groups (conv vs fc vs the
output layer, as Frankle & Carbin prune the output layer at half rate; attention vs MLP
vs embeddings in a Transformer). So every model built here carries `model.prunable`:
parameter name -> group, covering the weights of conv and linear layers and attention
projections, and embeddings when asked (never biases or norms, as in open_lth); see
`prunable_groups`. A pretrained `hf:PATH` model is engine/hf_models.py's.

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
from lth_search.config.data_section import TEXT_DATA

if TYPE_CHECKING:
    from lth_search.engine.data import Dataset
from lth_search.engine.plugins import MODEL_GROUP, resolve
from lth_search.errors import ConfigError, first_line
from lth_search.portable.architectures import (
    IMAGE_MODELS, NAMES, TRANSFORMER_OPTIONS, TransformerClassifier, build_architecture,
)

GROUPS = ("conv", "fc", "output", "shortcut", "attn", "mlp", "embed")
"""Layer groups a model here can have; `prune.layer_ratios` keys refer to these."""
TRANSFORMER_STD = 0.02
"""Standard deviation of the built-in Transformer's weights (see `_initialise_transformer`)."""
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate")
_ADAPTER_WORDS = ("lora_a", "lora_b", "lora_embedding_a", "lora_embedding_b", "lora_magnitude_vector")


# Registry -----------------------------------------------------------------------------------
def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        shape = "(" + ",".join(str(s) for s in input_shape) + ("," if len(input_shape) == 1 else "") + ")"
        raise ConfigError(f"model.name: {name} needs image input (C,H,W), data gives {shape}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def _check_transformer(cfg: ModelConfig, input_shape: tuple[int, ...]) -> None:
    """ConfigError unless `transformer` / `vit` can cut `input_shape` into tokens."""
    if cfg.name == "vit":
        _, height, width = _image_shape(cfg.name, input_shape)
        if height % cfg.patch or width % cfg.patch:
            raise ConfigError(f"model.patch: {cfg.patch} must divide the image sides {height}x{width}")
    elif cfg.vocab_size:
        if len(input_shape) != 1:
            raise ConfigError(f"model.vocab_size: token ids are one sequence per example, data gives {input_shape}")
    elif len(input_shape) not in (1, 2, 3) or input_shape[0] % cfg.patch:
        raise ConfigError(f"model.patch: {cfg.patch} must divide the sequence length of inputs {input_shape} "
                          "((T,) points, (T, F) features, or (C, H, W) for vit)")
    if len(input_shape) == 3 and cfg.name == "transformer":
        raise ConfigError("model.name: transformer takes sequences; use vit for images (C, H, W)")


def _builtin(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    if cfg.name in IMAGE_MODELS:
        _image_shape(cfg.name, input_shape)
    if cfg.name in ("transformer", "vit"):
        _check_transformer(cfg, input_shape)
    options = {key: getattr(cfg, key) for key in TRANSFORMER_OPTIONS}
    with torch.device("meta"):
        model = build_architecture(cfg.name, input_shape, num_classes, cfg.widths, cfg.width, cfg.batch_norm,
                                   **options)
    model = _materialised(model)
    generator = torch.Generator().manual_seed(int(seed))
    if isinstance(model, TransformerClassifier):
        _initialise_transformer(model, generator)
    else:
        _initialise(model, generator)
    return model


def _materialised(model: nn.Module) -> nn.Module:
    """`model.to_empty(device="cpu")` without its import: `to_empty` calls `empty_like` on each meta
    tensor, and the meta kernel of `empty_like` (torch._refs) imports torch.fx's symbolic shapes and
    sympy, 0.8 s of a core the first time in every process (each trial actor, each panel worker, each
    lineage command). `empty_strided` from the meta tensor's sizes and strides allocates the same
    uninitialised storage, through the same `Module._apply` that `to_empty` uses; `_initialise` fills
    every tensor either way (checked: the seven config models' state dicts, values and strides, are
    the same bytes)."""
    return model._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu"))


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


def _initialise_transformer(model: TransformerClassifier, generator: torch.Generator) -> None:
    """The built-in Transformer's initialisation, drawn from `generator` only.

    Every weight matrix (token / patch embedding, Q/K/V and output projections, MLP,
    head) and the position embedding ~ N(0, 0.02^2) truncated at 2 sigma, biases 0,
    LayerNorm weight 1 and bias 0: the initialisation of ViT (timm) and BERT, which the
    lottery-ticket studies of Transformers prune and rewind to. Kaiming's fan-in rule,
    used for the ReLU nets here, is derived for a plain stack; in a pre-norm Transformer
    every block reads a LayerNorm'd copy of the residual stream and adds its output back,
    and a small fixed scale keeps each block near the identity at the start, which is
    what lets these models train without warm-up at a constant learning rate.
    """
    with torch.no_grad():
        model.position.copy_(_truncated_normal(model.position, generator))
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(_truncated_normal(module.weight, generator))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.MultiheadAttention):
                module.in_proj_weight.copy_(_truncated_normal(module.in_proj_weight, generator))
                module.in_proj_bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def _truncated_normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    value = torch.empty(like.shape, dtype=like.dtype)
    return nn.init.trunc_normal_(value, std=TRANSFORMER_STD, a=-2 * TRANSFORMER_STD, b=2 * TRANSFORMER_STD,
                                 generator=generator)


def _words(path: str) -> list[str]:
    return [part.lower() for part in path.split(".") if part]


def _group_of(path: str, module: nn.Module, parent: nn.Module | None) -> str:
    """The layer group of a linear (or GPT-2 Conv1D) module at `path`, before the output rule."""
    words = _words(path)
    if any("embed" in w for w in words):
        return "embed"
    if isinstance(parent, nn.MultiheadAttention) or any(a in w for w in words for a in _ATTENTION_WORDS):
        return "attn"
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) or any(
            m in w for w in words for m in _MLP_WORDS):
        return "mlp"
    return "fc"


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2 keeps its linear maps in those)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2)


def _candidates(model: nn.Module) -> list[tuple[str, str]]:
    """(parameter name, group) for every weight that could be pruned, in registration order."""
    modules = dict(model.named_modules())
    found: list[tuple[str, str]] = []
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        parent = modules.get(name.rsplit(".", 1)[0] if "." in name else "", None) if name else None
        if isinstance(module, nn.Embedding):
            found.append((f"{prefix}weight", "embed"))
        elif isinstance(module, nn.MultiheadAttention):
            for attribute in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if isinstance(getattr(module, attribute, None), nn.Parameter):
                    found.append((f"{prefix}{attribute}", "attn"))
        elif isinstance(module, nn.modules.conv._ConvNd):
            group = "shortcut" if "shortcut" in name.split(".") else "conv"
            found.append((f"{prefix}weight", "embed" if any("embed" in w for w in _words(name)) else group))
        elif _is_linear(module):
            found.append((f"{prefix}weight", _group_of(name, module, parent)))
    return found


def prunable_groups(model: nn.Module, embeddings: bool = False, target: str = "base") -> dict[str, str]:
    """Prunable parameter name -> layer group, for any architecture.

    Models built here carry the answer as `model.prunable`. For any other module it is
    derived from its layers and their names:

    - conv weights are "conv" (1x1 convs inside a `shortcut` are "shortcut");
    - attention projections are "attn": `nn.MultiheadAttention`'s `in_proj_weight` (or its
      q/k/v_proj_weight) and `out_proj`, and any linear map under a module whose name says
      attention (`self_attn.q_proj`, `attention.self.query`);
    - a Transformer layer's feed-forward maps are "mlp" (`linear1`/`linear2` of torch's
      layers, anything under `mlp`, `ffn`, `feed_forward`, `intermediate`);
    - embeddings are "embed" (`nn.Embedding`, and linear or conv maps under a name with
      "embed": patch and point projections), and prunable only if `embeddings`;
    - other linear weights are "fc", and the last of them registered is "output".

    Norms and biases never are. With LoRA adapters (peft) in the model, `target` "base"
    prunes the base weights and "lora" the adapters (`lora_A`/`lora_B`, grouped by where
    they sit); peft's frozen copy of a fully trained module (`original_module`) is never
    pruned. Only names in `named_parameters()` are returned: a weight tied to another
    (an LM head tied to the embedding) appears once, under its first name.
    """
    existing = getattr(model, "prunable", None)
    if isinstance(existing, dict):
        return dict(existing)
    parameters = dict(model.named_parameters())
    groups: dict[str, str] = {}
    for name, group in _candidates(model):
        words = _words(name)
        if name not in parameters or "original_module" in words:
            continue
        if (any(w in _ADAPTER_WORDS for w in words)) != (target == "lora"):
            continue
        if group == "embed" and not embeddings:
            continue
        groups[name] = group
    last_fc = [name for name, group in groups.items() if group == "fc"]
    if last_fc and target == "base":
        groups[last_fc[-1]] = "output"
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
    if data is None and cfg.data.name in TEXT_DATA:
        from lth_search.engine.data import load_dataset

        data = load_dataset(cfg.data, cfg.seed)
    shape, classes = (data.input_shape, data.num_classes) if data is not None else data_signature(cfg.data)
    if data is not None:
        _check_text_fit(cfg.model, data)
    model = build_model(cfg.model, shape, classes, cfg.seed)
    check_layer_groups(dict(model.prunable), cfg.prune.layer_ratios)


def _check_text_fit(cfg: ModelConfig, data: "Dataset") -> None:
    """ConfigError when the model cannot read the data's tokens or predict its targets."""
    if cfg.is_pretrained:
        wanted = "causal_lm" if data.task == "causal_lm" else "classification"
        if cfg.head != wanted:
            raise ConfigError(f"model.head: {cfg.head} does not fit data.name {data.name} ({data.task}); use {wanted}")
        return
    if data.task == "causal_lm":
        raise ConfigError(f"data.name: {data.name} (causal language modelling) needs model.name: hf:PATH with "
                          "model.head: causal_lm")
    if data.vocab_size and cfg.name == "transformer" and cfg.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"{data.vocab_size}; set model.vocab_size: {data.vocab_size}")
    if data.vocab_size and cfg.name != "transformer":
        raise ConfigError(f"model.name: {cfg.name} takes float inputs; token ids ({data.name}) need transformer "
                          "(with model.vocab_size) or an hf:PATH model")


def layer_sizes(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Prunable layer -> (group, weights) of a built model: what tracking needs to sum per-layer
    sparsity into per-group sparsity."""
    parameters = dict(model.named_parameters())
    return {name: (group, parameters[name].numel()) for name, group in model.prunable.items()}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build `cfg.name` for inputs of `input_shape` (no batch axis), seeded by `seed`, on CPU.

    The result has `.prunable` (see `prunable_groups`). Raises ConfigError when the model
    cannot take the data (a conv model on flat features).
    """
    if num_classes < 1:
        raise ConfigError(f"model: need at least one class, data gives {num_classes}")
    input_shape = tuple(int(s) for s in input_shape)
    if cfg.is_pretrained:
        from lth_search.engine.hf_models import build_pretrained

        model = build_pretrained(cfg, input_shape, num_classes, seed)
    else:
        model = (_builtin if cfg.name in NAMES else _plugin)(cfg, input_shape, num_classes, seed)
    model.prunable = prunable_groups(model, cfg.prune_embeddings, cfg.prune_target)
    if not model.prunable:
        raise ConfigError(f"model.name: {cfg.name} has no conv or linear layer to prune")
    return model

