"""What a validation measures: one pydantic model, read by `gatenorm validate` (its flags are generated from
it, `gatenorm.validate.flags`), by recipes (``validation:``, the same model plus ``enabled`` and
``fail_on_gates``) and by `gatenorm.validate.run.validate`. Every default is defined here once."""

from __future__ import annotations

import functools
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from gatenorm.validate.bench import BenchConfig
from gatenorm.validate.gates import Gates
from gatenorm.validate.metrics import gates_model
from gatenorm.validate.passkey import RETRIEVAL_TASKS, PasskeyConfig
from gatenorm.validate.zeroshot import DEFAULT_TASKS, TASKS


class ValidationSettings(BaseModel):
    """Text agreement, zero-shot tasks, latency, retrieval and gates of one validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    text: str = Field("wiki", description="'wiki' (shipped Wikipedia leads) or a UTF-8 text file.")
    ctx: int = Field(512, ge=8, description="Window size; the second half of each window is scored.")
    max_tokens: int = Field(20480, ge=0, description="Tokens of text to score (whole windows); 0 skips.")
    tasks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TASKS),
        description="Zero-shot tasks (and passkey, passkey_multi); none: no tasks.",
    )
    limit: int = Field(200, ge=0, description="Items per task (the first N); 0 = all.")
    threads: int = Field(2, ge=0, description="CPU threads per model; 0 = all cores.")
    bench: BenchConfig | None = Field(None, description="Latency, RSS and file size (None: not measured).")
    passkey: PasskeyConfig = Field(default_factory=PasskeyConfig)
    gates: Gates = Field(default_factory=Gates)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        known = [*TASKS, *RETRIEVAL_TASKS]
        unknown = [t for t in value if t not in known]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(known)})")
        return list(dict.fromkeys(value))

    @property
    def item_limit(self) -> int | None:
        """Items per task, None for all."""
        return self.limit or None


S = TypeVar("S", bound=ValidationSettings)


@functools.cache
def with_gates(model: type[S], gates: type[BaseModel]) -> type[S]:
    """`model` (`ValidationSettings` or a subclass) with `gates` as its gates model."""
    if model.model_fields["gates"].annotation is gates:
        return model
    return create_model(
        model.__name__, __base__=model, __doc__=model.__doc__, gates=(gates, Field(default_factory=gates))
    )


def settings_model() -> type[ValidationSettings]:
    """`ValidationSettings` with the gates of the metrics registered now (`gates_model`): a metric
    registered after import has its gate here, hence its ``gatenorm validate`` flag."""
    return with_gates(ValidationSettings, gates_model())
