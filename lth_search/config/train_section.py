"""The `train` section: the recipe of every training run (dense stage and each round's retraining).

A length (`steps`, `warmup_steps`, `milestones`) may be written in iterations or epochs;
stage keys hash the resolved iteration count (`resolve_steps`), so "2ep" and the same
number of iterations name the same stage. Only `recipe()` enters stage keys: the device
and the evaluation batching change how fast a stage runs, not what it computes.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import Field, field_validator

from lth_search.config.names import quote
from lth_search.config.section import MAX_LIST, MAX_STEPS, Section

Steps = Union[int, str]
"""A training length: an iteration count (int or "500it") or epochs ("2ep")."""

_STEPS_RE = re.compile(r"\s*(\d{1,12})\s*(it|ep)\s*")
MAX_EPOCHS = 10**5


def _check_steps(value: Steps, field: str) -> Steps:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an iteration count or a string like '500it' or '2ep'")
    if isinstance(value, int):
        if not 0 <= value <= MAX_STEPS:
            raise ValueError(f"{field} must be an iteration count in [0, {MAX_STEPS}], got {value}")
        return value
    match = _STEPS_RE.fullmatch(value)
    if not match:
        raise ValueError(f"{field} must be an iteration count or a string like '500it' or '2ep', got {quote(value)}")
    count, unit = int(match.group(1)), match.group(2)
    limit = MAX_STEPS if unit == "it" else MAX_EPOCHS
    if count > limit:
        raise ValueError(f"{field} must be at most {limit}{unit}, got {quote(value)}")
    return value


def resolve_steps(value: Steps, steps_per_epoch: int) -> int:
    """Canonical iteration count of a length given as int, "Nit" or "Nep".

    Stage keys hash the resolved count, so "2ep" and the equivalent "Nit" share stages.
    """
    if isinstance(value, int):
        return value
    match = _STEPS_RE.fullmatch(value)
    assert match, value
    count, unit = int(match.group(1)), match.group(2)
    return count if unit == "it" else count * steps_per_epoch


class TrainConfig(Section):
    """The training recipe, used for the dense stage and for every round's retraining."""

    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-2, gt=0, le=100)
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(100, ge=1, le=2**20)
    steps: Steps = Field(1500, description="training length T per stage: iterations or 'Nep'")
    schedule: Literal["constant", "step", "cosine"] = "constant"
    milestones: list[Steps] = Field([], max_length=MAX_LIST, description="step schedule: lr x gamma at each of these steps")
    gamma: float = Field(0.1, gt=0, le=100)
    warmup_steps: Steps = Field(0, description="linear lr warmup length")
    augment: Literal["none", "crop_flip"] = Field(
        "none", description="training augmentation: crop_flip = random 4-pixel-padded crops + horizontal flips (CIFAR)"
    )
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda or cuda:N")
    eval_batch_size: int = Field(2000, ge=1, le=2**20)

    @field_validator("steps", "warmup_steps")
    @classmethod
    def _steps(cls, value: Steps, info: Any) -> Steps:
        return _check_steps(value, f"train.{info.field_name}")

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, values: list[Steps]) -> list[Steps]:
        return [_check_steps(v, "train.milestones") for v in values]

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {quote(value)}")
        return value

    def recipe(self) -> dict[str, Any]:
        """What determines training results (device and eval batching do not)."""
        return self.model_dump(exclude={"device", "eval_batch_size"})
