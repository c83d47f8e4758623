"""The `model` section: the architecture (its initialisation is seeded by the experiment seed).

The bounds keep a typo from becoming a MemoryError: an `mlp` is at most MAX_WIDTH wide
and MAX_HIDDEN_WEIGHTS large, refused at validation before anything is built.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from lth_search.config.names import quote
from lth_search.config.section import MAX_LIST, RegisteredName, Section

MAX_WIDTH = 16384
MAX_HIDDEN_WEIGHTS = 10**8
"""Hidden-to-hidden weights of an `mlp` (400 MB in float32); more is a MemoryError, not a model."""


class ModelConfig(Section):
    """Architecture. Initialisation is seeded by the experiment seed."""

    name: RegisteredName = Field(
        "mlp",
        description="model: built in (mlp, lenet_300_100, conv2/4/6, resnet20, vgg16; see engine/models.py), an "
        "entry point of group lth_search.models, or package.module:factory(input_shape, num_classes) -> nn.Module",
    )
    widths: list[int] = Field([100, 100], max_length=MAX_LIST, description="hidden widths of `mlp`")
    width: int = Field(16, ge=1, le=1024, description="base width of resnet20 (16 = the paper's)")
    batch_norm: bool = Field(True, description="batch norm in vgg16")

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(not 1 <= w <= MAX_WIDTH for w in widths):
            raise ValueError(f"every width must be in [1, {MAX_WIDTH}], got {quote(widths)}")
        hidden = sum(a * b for a, b in zip(widths, widths[1:]))
        if hidden > MAX_HIDDEN_WEIGHTS:
            raise ValueError(f"{hidden} hidden weights; at most {MAX_HIDDEN_WEIGHTS} (use narrower layers)")
        return widths
