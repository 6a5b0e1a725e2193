"""The base of every recipe section (kept apart so that the schema's modules share it without a cycle)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # No key means "forever" or "undefined": an inf or NaN float is a typo (or `.inf`) that training would trip on.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
