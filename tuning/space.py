"""Search-space dimensions of a search config: one YAML key each, converted to Ray Tune's samplers.

    {uniform: {low, high}}   {loguniform: {low, high}}   {randint: {low, high}} (both ends included)
    {choice: [a, b, ...]}    {grid: [a, b, ...]} (every value, crossed with the other grid dimensions)

`corners()` are the values validation substitutes into the base config (bounds, every choice).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Range(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Uniform(_Strict):
    uniform: _Range

    def to_tune(self):
        from ray import tune

        return tune.uniform(self.uniform.low, self.uniform.high)

    def corners(self) -> list:
        return [self.uniform.low, self.uniform.high]


class _PositiveRange(_Range):
    @model_validator(mode="after")
    def _positive(self):
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        return self


class LogUniform(_Strict):
    loguniform: _PositiveRange

    def to_tune(self):
        from ray import tune

        return tune.loguniform(self.loguniform.low, self.loguniform.high)

    def corners(self) -> list:
        return [self.loguniform.low, self.loguniform.high]


class _IntRange(_Strict):
    low: int
    high: int  # included

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class RandInt(_Strict):
    """An integer drawn uniformly from low..high, both ends included."""

    randint: _IntRange

    def to_tune(self):
        from ray import tune

        return tune.randint(self.randint.low, self.randint.high + 1)  # Tune's high is excluded

    def corners(self) -> list:
        return [self.randint.low, self.randint.high]


class Choice(_Strict):
    choice: list[Any] = Field(min_length=1)

    def to_tune(self):
        from ray import tune

        return tune.choice(self.choice)

    def corners(self) -> list:
        return list(self.choice)


class Grid(_Strict):
    """Every value, each crossed with the other grid dimensions (× num_samples for random draws)."""

    grid: list[Any] = Field(min_length=1)

    def to_tune(self):
        from ray import tune

        return tune.grid_search(self.grid)

    def corners(self) -> list:
        return list(self.grid)


DIMENSIONS = ("uniform", "loguniform", "randint", "choice", "grid")


def _dimension_kind(value) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        return next(iter(value))
    return getattr(value, "__class__", type(None)).__name__.lower() if isinstance(value, BaseModel) else None


Dimension = Annotated[
    Union[
        Annotated[Uniform, Tag("uniform")],
        Annotated[LogUniform, Tag("loguniform")],
        Annotated[RandInt, Tag("randint")],
        Annotated[Choice, Tag("choice")],
        Annotated[Grid, Tag("grid")],
    ],
    Discriminator(
        _dimension_kind,
        custom_error_type="dimension",
        custom_error_message="give exactly one of "
        + ", ".join(DIMENSIONS)
        + ", e.g. {loguniform: {low: 0.001, high: 0.1}}",
    ),
]
