"""What a pruning method is: a `MethodSpec` (name, data it needs, default calibration, actions, options
model, label) declared next to its ranking function with `@register_method`.

This module holds the table the decorator fills; `gatenorm.methods.registry` imports every method module
at its top, so importing the registry registers them all (mergekit's merge_methods pattern). Method modules
import only this module, never the registry: no import cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from gatenorm.errors import GatenormError
from gatenorm.methods.calibration import Calibration
from gatenorm.methods.cost import Phase
from gatenorm.plan import LayerAction
from gatenorm.readers import Checkpoint
from gatenorm.scoring import LayerScores


@dataclass(frozen=True)
class MethodOptions:
    """Settings a method may use: the seed (random), calibration text (data-driven methods), and the context
    length of the cost model and of the data-free alpha."""

    seed: int = 0
    calib: Calibration | None = None
    ctx: int = 512
    #: what an estimated speedup target is about: a prompt of `ctx` tokens, or decoding at depth `ctx`
    speedup_for: Phase = "prefill"
    #: the plan will be healed (`gatenorm.heal`) in this form: a speedup target counts the fitted maps
    #: the form gives (`gatenorm.heal.forms.mapped_layers`)
    heal: str | None = None
    log: Callable[[str], None] = field(default=lambda _: None, compare=False)


@dataclass
class Ranking:
    """A method's scores (lowest changed first), the action it gives each changed layer, and alphas of the
    layers it would linearize. `extra` holds method-specific per-layer diagnostics."""

    scores: LayerScores
    actions: list[LayerAction]
    alphas: dict[int, float] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)


def per_layer_fields(stats) -> dict[str, list[float]]:
    """The per-layer (list-valued) fields of a statistics dataclass, as a ranking's `extra`."""
    values = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    return {name: value for name, value in values.items() if isinstance(value, list)}


class MethodSettings(BaseModel):
    """How a method runs: seed, calibration text and windows, and the context of the cost model / alpha.
    The CLI's method flags (--seed, --calib, --calib-samples, --calib-len, --ctx, --speedup-for) are
    generated from it (`gatenorm.validate.flags.with_settings_flags`); a recipe method entry gives
    ``seed`` and ``calib`` beside its ``options``, the rest in them. A method may declare a subclass with
    more fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="Seed of the random method and of synthetic calibration text.")
    calib: str | None = Field(
        None,
        description="Calibration text of data-driven methods: a UTF-8 file, wiki-heldout (the shipped "
        "Wikipedia leads read from the end, never reached by the evaluation text), or synthetic (text the "
        "model generates itself: no data; the default of mixed-synthetic).",
    )
    calib_samples: int = Field(16, ge=1, description="Calibration windows.")
    calib_len: int = Field(256, ge=8, description="Tokens per calibration window.")
    ctx: int = Field(
        512, ge=0, description="Context length of the cost model and of the data-free HARP alpha."
    )
    speedup_for: Phase = Field(
        "prefill",
        description="What --budget-speedup is about: prefill (a prompt of --ctx tokens) or decode "
        "(generating at depth --ctx, where attention's share grows with the depth).",
    )

    def method_options(self, **kwargs) -> MethodOptions:
        """The `MethodOptions` these settings give (`kwargs`: its other fields, heal and log)."""
        calibration = (
            None if self.calib is None else Calibration(self.calib, self.calib_samples, self.calib_len)
        )
        return MethodOptions(
            seed=self.seed, calib=calibration, ctx=self.ctx, speedup_for=self.speedup_for, **kwargs
        )


#: How a method ranks: (checkpoint, options, at most this many layers will be changed, or None) -> Ranking.
RankFn = Callable[[Checkpoint, MethodOptions, "int | None"], Ranking]


@dataclass(frozen=True)
class MethodSpec:
    """One pruning method, everything callers need to know about it."""

    name: str
    rank: RankFn
    #: the name in tables and plots (the study, reports)
    label: str
    #: what it does, in one line (CLI help)
    summary: str
    #: the actions its plans may give a changed layer
    actions: frozenset[LayerAction]
    #: needs calibration text (--calib) from the user
    data: bool = False
    #: calibration used when none is given (mixed-synthetic: text the model generates)
    default_calib: Calibration | None = None
    #: ranks layers only (drop-attention by score); such methods alone may drop layer 0 on request
    score_only: bool = False
    #: the model of a recipe entry's ``options``
    options: type[MethodSettings] = MethodSettings
    #: part of the methods study (`gatenorm.study`) by default
    in_study: bool = True

    @property
    def data_label(self) -> str:
        """What the method reads, in words (CLI help, study tables)."""
        if self.data:
            return "calibration text"
        if self.default_calib is not None:
            return f"{self.default_calib.source} text (no data)"
        return "weights only"


#: Every registered method by name, in registration order (filled by `register_method`).
SPECS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    label: str,
    summary: str,
    actions: set[LayerAction] | frozenset[LayerAction],
    data: bool = False,
    default_calib: Calibration | None = None,
    score_only: bool = False,
    options: type[MethodSettings] = MethodSettings,
    in_study: bool = True,
) -> Callable[[RankFn], RankFn]:
    """Declare the decorated ranking function as method `name` (a GatenormError if the name is taken)."""

    def decorate(rank: RankFn) -> RankFn:
        if name in SPECS:
            raise GatenormError(f"method {name!r} is registered twice")
        SPECS[name] = MethodSpec(
            name, rank, label, summary, frozenset(actions), data, default_calib, score_only, options, in_study
        )
        return rank

    return decorate


def unregister_method(name: str) -> None:
    """Remove method `name` (tests that register a throw-away method)."""
    SPECS.pop(name, None)
