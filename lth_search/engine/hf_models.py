"""Pretrained models: `model.name: hf:PATH`, a transformers model read from a local folder.

The lottery ticket of a pretrained network rewinds to the pretrained weights (Chen et
al. 2020, "The Lottery Ticket Hypothesis for Pre-trained BERT Networks"): the dense
stage's θ0 is whatever `build_model` returns, so loading the checkpoint here makes θ0
the pretrained weights with no change to the lineage. What is not in the checkpoint (a
new sequence-classification head, LoRA adapters) is initialised by transformers' and
peft's own code under a private RNG seeded by the lineage's seed, so a build is a pure
function of (folder, config, seed), as every other model here.

- `model.head: classification` loads AutoModelForSequenceClassification with
  `num_labels` = the data's classes; `causal_lm` loads AutoModelForCausalLM.
- `model.lora` wraps the model with peft's LoRA (`get_peft_model`; the base is frozen, the
  adapters and a classification head train). `model.prune_target` then chooses what IMP
  prunes and rewinds: the base weights (`base`) or the adapters (`lora`), see
  engine/models.py `prunable_groups`.

The engine calls a model with one tensor of token ids and wants one tensor back. Two
hooks adapt the transformers call: before it, the attention mask (every position up to
the last non-pad token; right padding) and `use_cache=False`; after it, the logits,
(N, classes) for a classifier and (N, vocab, T) for a causal LM, the layout
`nn.CrossEntropyLoss` takes with next-token targets of shape (N, T). Parameter names stay
transformers' / peft's own, so a ticket's masks apply to the same model built with
transformers and peft (`...self_attn.q_proj.base_layer.weight_mask`).

Nothing is downloaded: a path that is no folder but looks like a hub id is one line
naming the command that fetches it on a connected machine.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lth_search.config import ModelConfig
from lth_search.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _folder(cfg: ModelConfig) -> Path:
    path = Path(cfg.pretrained_path).expanduser()
    if (path / "config.json").is_file():
        return path
    if not path.exists() and _HUB_ID.match(cfg.pretrained_path):
        raise ConfigError(
            f"model.name: {cfg.name} is not a local folder and nothing is downloaded at run time; on a connected "
            f"machine run `hf download {cfg.pretrained_path} --local-dir DIR` and set model.name: hf:DIR")
    raise ConfigError(f"model.name: {cfg.name}: no transformers model in {path} (config.json missing); save one "
                      "there with save_pretrained, or fetch one with `hf download ID --local-dir DIR`")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.name: hf: models need transformers (and peft for model.lora); "
                          "pip install 'lth-search[hf]'") from None
    return transformers


@contextlib.contextmanager
def _quiet_and_seeded(seed: int) -> Iterator[None]:
    """Transformers' progress bars and notes about newly initialised heads off, the global RNG
    forked and seeded (a new head and LoRA's A matrices draw from it)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.manual_seed(int(seed))
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _pad_id(model: nn.Module, folder: Path) -> int:
    """The pad token id: the model config's, else its tokenizer's (pad, then eos), else eos."""
    config = model.config
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is not None:
            return int(pad)
    eos = config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        raise ConfigError(f"model.name: hf:{folder}: neither config.json nor a tokenizer there names a pad or "
                          "eos token; set pad_token_id in config.json")
    return int(eos)


def _lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("model.lora: LoRA needs peft; pip install 'lth-search[hf]'") from None
    lora = cfg.lora
    task = "CAUSAL_LM" if cfg.head == "causal_lm" else "SEQ_CLS"
    try:
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), task_type=task)
        return get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"model.lora: {str(error).splitlines()[0][:160]}") from None


def _attention_mask(pad_id: int):
    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None and kwargs.get("attention_mask") is None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            last = torch.where(ids != pad_id, positions, -1).amax(dim=1, keepdim=True)
            kwargs["attention_mask"] = (positions <= last).long()
        kwargs.setdefault("use_cache", False)
        return args, kwargs

    return before


def _logits_only(causal: bool):
    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output[0]
        return logits.transpose(1, 2) if causal else logits

    return after


def build_pretrained(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """The pretrained model of `cfg` (θ0 = the checkpoint; new parts seeded by `seed`), on CPU, float32."""
    transformers = _import_transformers()
    folder = _folder(cfg)
    if len(input_shape) != 1:
        raise ConfigError(f"model.name: {cfg.name} reads token ids (a text data set), data gives inputs {input_shape}")
    with _quiet_and_seeded(seed):
        try:
            if cfg.head == "causal_lm":
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(folder), local_files_only=True, dtype=torch.float32)
            else:
                model = transformers.AutoModelForSequenceClassification.from_pretrained(
                    str(folder), num_labels=num_classes, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"model.name: {cfg.name}: cannot load ({str(error).splitlines()[0][:160]})") from None
        pad = _pad_id(model, folder)
        model.config.pad_token_id = pad
        if cfg.lora is not None:
            model = _lora(model, cfg)
    # Packs stack members' state dicts under vmap; transformers' models keep buffers outside
    # the state dict (rotary tables), so their lineages train one after another.
    model.pack_sequential = True
    model.register_forward_pre_hook(_attention_mask(pad), with_kwargs=True)
    model.register_forward_hook(_logits_only(cfg.head == "causal_lm"), with_kwargs=True)
    return model.to("cpu")
