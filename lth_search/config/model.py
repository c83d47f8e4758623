"""The `model` section: the architecture (its initialisation is seeded by the experiment seed).

The bounds keep a typo from becoming a MemoryError: an `mlp` is at most MAX_WIDTH wide
and MAX_HIDDEN_WEIGHTS large, refused at validation before anything is built.

What is prunable is a property of the built model (`model.prunable`, engine/models.py),
so the two switches that change it live here: `prune_embeddings` and, for a pretrained
model with LoRA adapters, `prune_target`. They enter the dense stage's key with the rest
of this section; a round's key chains from it, so the masks they shape are keyed too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from lth_search.config.names import check_location, check_registered_name, quote
from lth_search.config.section import MAX_LIST, Section

MAX_WIDTH = 16384
MAX_HIDDEN_WEIGHTS = 10**8
"""Hidden-to-hidden weights of an `mlp` (400 MB in float32); more is a MemoryError, not a model."""
HF_PREFIX = "hf:"
"""`model.name: hf:PATH` loads a Hugging Face transformers model from the local folder PATH."""


def _check_model_name(value: str) -> str:
    if value.startswith(HF_PREFIX):
        check_location(value[len(HF_PREFIX):], "model.name hf:PATH", ValueError)
        return value
    return check_registered_name(value)


ModelName = Annotated[str, AfterValidator(_check_model_name)]


class LoraConfig(Section):
    """LoRA adapters on a pretrained (`hf:`) model, as peft's LoraConfig takes them."""

    r: int = Field(16, ge=1, le=4096, description="rank of the adapters")
    alpha: float = Field(32.0, gt=0, le=1e6, description="scale alpha (the update is alpha / r * B A)")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the adapters' input; 0 keeps a stage a function of its key "
        "(dropout draws from the global RNG)"
    )
    target_modules: list[str] = Field(
        ["q_proj", "v_proj"], min_length=1, max_length=MAX_LIST,
        description="module names (last component) that get adapters, e.g. q_proj, v_proj",
    )


class ModelConfig(Section):
    """Architecture. Initialisation is seeded by the experiment seed."""

    name: ModelName = Field(
        "mlp",
        description="model: built in (mlp, lenet_300_100, conv2/4/6, resnet20, vgg16, transformer, vit; see "
        "engine/models.py), hf:PATH (a transformers model in the local folder PATH; see engine/hf_models.py), an "
        "entry point of group lth_search.models, or package.module:factory(input_shape, num_classes) -> nn.Module",
    )
    widths: list[int] = Field([100, 100], max_length=MAX_LIST, description="hidden widths of `mlp`")
    width: int = Field(16, ge=1, le=1024, description="base width of resnet20 (16 = the paper's)")
    batch_norm: bool = Field(True, description="batch norm in vgg16")
    d_model: int = Field(64, ge=1, le=16384, description="transformer / vit: width of the token vectors")
    heads: int = Field(4, ge=1, le=256, description="transformer / vit: attention heads (must divide d_model)")
    layers: int = Field(2, ge=1, le=256, description="transformer / vit: encoder layers")
    ff_width: int = Field(128, ge=1, le=65536, description="transformer / vit: hidden width of each layer's MLP")
    patch: int = Field(
        1, ge=1, le=1024, description="transformer: points of a sequence per token; vit: side of the square "
        "image patch per token (must divide the input's length or sides)"
    )
    vocab_size: int = Field(
        0, ge=0, le=10**7, description="transformer over token ids: rows of the embedding table (at least the "
        "tokenizer's vocabulary, which a text data set checks); 0 = float inputs (sequence points)"
    )
    prune_embeddings: bool = Field(
        False, description="prune embedding weights too (token embeddings, patch / point projections: group "
        "'embed'); off by default, as in the lottery-ticket studies of Transformers"
    )
    head: Literal["classification", "causal_lm"] = Field(
        "classification", description="hf: models: a sequence-classification head (num_labels = the data's "
        "classes; a new head is seeded) or the causal LM head (with a causal-LM text data set)"
    )
    lora: LoraConfig | None = Field(None, description="hf: models: LoRA adapters (peft); null = full fine-tuning")
    prune_target: Literal["base", "lora"] = Field(
        "base", description="what IMP prunes and rewinds: the base weights (fine-tuned fully, or frozen under LoRA) "
        "or the LoRA adapters themselves (needs model.lora)"
    )

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(not 1 <= w <= MAX_WIDTH for w in widths):
            raise ValueError(f"every width must be in [1, {MAX_WIDTH}], got {quote(widths)}")
        hidden = sum(a * b for a, b in zip(widths, widths[1:]))
        if hidden > MAX_HIDDEN_WEIGHTS:
            raise ValueError(f"{hidden} hidden weights; at most {MAX_HIDDEN_WEIGHTS} (use narrower layers)")
        return widths

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.d_model % self.heads:
            raise ValueError(f"model.heads: {self.heads} does not divide model.d_model {self.d_model}")
        if self.prune_target == "lora" and self.lora is None:
            raise ValueError("model.prune_target: lora needs model.lora (the adapters to prune)")
        if (self.lora is not None or self.head != "classification") and not self.is_pretrained:
            raise ValueError("model.lora and model.head apply to hf:PATH models only")
        return self

    @property
    def is_pretrained(self) -> bool:
        return self.name.startswith(HF_PREFIX)

    @property
    def pretrained_path(self) -> str:
        return self.name[len(HF_PREFIX):]
