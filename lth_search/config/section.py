"""What every config section shares: strict validation, the common bounds, registered names.

Each section of the YAML (data, model, train, ...) is a `Section` in a module of its
own beside this one; schema.py puts them together. Unknown keys are refused rather
than ignored, so a typo in a config is an error instead of a silently used default.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from lth_search.config.names import check_registered_name

MAX_STEPS = 10**8
"""Upper bound of any iteration count (~3 years at 1000 steps/s): larger is a typo, not a plan."""
MAX_LIST = 64
"""Longest list of widths, milestones, rewind steps or search values."""

RegisteredName = Annotated[str, AfterValidator(check_registered_name)]
"""A data set or model name (data.name, model.name): one rule for both (config/names.py)."""


class Section(BaseModel):
    """Every section: unknown keys refused, NaN and infinities refused in every float field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)
