"""The recipe: one YAML file that names the models, scoring methods, budgets, exports and validation of a
batch. Every model here forbids unknown keys, so a typo is an error before any work starts."""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from exporters.targets import TARGETS
from gatenorm.heal.fit import HealSettings
from gatenorm.methods.registry import METHODS
from gatenorm.recover.settings import RecoverySettings
from gatenorm.validate.metrics import Metric, gates_model, search_targets
from gatenorm.validate.settings import ValidationSettings, with_gates

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _short(key: str):
    """A list item may be a plain string, short for ``{key: string}``."""

    def expand(value: Any) -> Any:
        return {key: value} if isinstance(value, str) else value

    return expand


def _check_name(value: str | None) -> str | None:
    if value is not None and not _NAME.match(value):
        raise ValueError(f"{value!r} is not a file-name-safe name (letters, digits, '.', '_', '-')")
    return value


class ModelEntry(_Strict):
    """A source model: a GGUF file or HF folder, a shipped alias (smollm2, tiny), or a hub repository."""

    path: str | None = None
    hub: str | None = Field(None, description="Hugging Face repository id, downloaded when online.")
    revision: str | None = None
    file: str | None = Field(None, description="The GGUF file inside the hub repository, if it holds GGUFs.")
    name: str | None = Field(None, description="Short name used in variant names (default: from the path).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path and hub")
        if self.hub is None and (self.revision or self.file):
            raise ValueError("revision and file go with hub")
        _check_name(self.name)
        return self


class MethodEntry(_Strict):
    """A method (a name in `gatenorm.methods.METHODS`) and the options passed on to it (checked against the
    method's options model, `MethodSpec.options`)."""

    name: str
    seed: int = 0
    calib: str | None = Field(
        None, description="Calibration text (a file, 'wiki-heldout' or 'synthetic') for data-driven methods."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Further keyword options of the method."
    )
    heal: bool | HealSettings = Field(
        False,
        description="Heal every changed layer (`gatenorm.heal`): true for the default settings, or the "
        "settings (samples, length, ridge, bias, calib, ...). Variants are named <method>-healed.",
    )

    recover: bool | RecoverySettings = Field(
        False,
        description="Recover every plan by distillation after healing, if healed (`gatenorm.recover`): "
        "true for the default settings, or the settings (steps, rank, layers, targets, calib, ...). Variants "
        "are named <method>-recovered (<method>-healed-recovered).",
    )

    @property
    def heal_settings(self) -> HealSettings | None:
        """The healing settings of this entry (None: not healed)."""
        if self.heal is False:
            return None
        return HealSettings() if self.heal is True else self.heal

    @property
    def recover_settings(self) -> RecoverySettings | None:
        """The recovery settings of this entry (None: not recovered)."""
        if self.recover is False:
            return None
        return RecoverySettings() if self.recover is True else self.recover

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r} (known: {', '.join(METHODS)})")
        return value


class TargetBase(_Strict):
    """A budget searched for: the most layers dropped whose quality holds, or the fewest reaching a speedup.

    Quality targets (one per metric of `gatenorm.validate.metrics` that declares a `target`: ``max_kld``,
    ``min_top1``, ...) are measured in PyTorch against the unpruned model on the search text (see `Search`);
    `min_speedup` uses the cost model's speedup of the method's actions for `speedup_for` (prefill: a prompt
    of `ctx` tokens; decode: generating at depth `ctx`), `ctx` defaulting to the validation context.
    """

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetBase:
        kinds = self.kinds()
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a target budget names exactly one of {', '.join(kinds)}")
        if given != ["min_speedup"] and (self.ctx is not None or self.speedup_for != "prefill"):
            raise ValueError("speedup_for and ctx go with min_speedup")
        return self

    @classmethod
    def kinds(cls) -> list[str]:
        """The bounds a target may name: ``max_kld``, ..., ``min_speedup``."""
        return [k for k in cls.model_fields if k not in ("speedup_for", "ctx")]

    @property
    def kind(self) -> str:
        return next(k for k in self.kinds() if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.kind)

    @property
    def metric(self) -> Metric:
        """The metric a quality target bounds (`min_speedup` has none)."""
        return next(m for m in search_targets() if m.gate_name == self.kind)

    @property
    def label(self) -> str:
        at = "" if self.speedup_for == "prefill" and self.ctx is None else f"@{self.speedup_for}"
        at += "" if self.ctx is None else str(self.ctx)
        return f"{self.kind}={self.value:g}{at}"


@functools.cache
def _target_model(metrics: tuple[Metric, ...]) -> type[TargetBase]:
    return create_model(
        "Target",
        __base__=TargetBase,
        __doc__=TargetBase.__doc__,
        **{m.gate_name: (float | None, Field(None, **m.target)) for m in metrics},
        min_speedup=(float | None, Field(None, gt=1)),
        speedup_for=(Literal["prefill", "decode"], "prefill"),
        ctx=(int | None, Field(None, ge=0, description="min_speedup: the cost model's context or depth.")),
    )


def target_model() -> type[TargetBase]:
    """The target budget model of the metrics registered now: one optional bound per searchable metric
    (`gatenorm.validate.metrics.search_targets`), then the speedup target (built once per registry
    contents)."""
    return _target_model(tuple(search_targets()))


def _budget(target: type[TargetBase]) -> Any:
    """A budget is a number of layers to drop, or a `target` to search for."""
    return Annotated[
        Annotated[Annotated[int, Field(ge=0)], Tag("layers")] | Annotated[target, Tag("target")],
        Discriminator(lambda v: "target" if isinstance(v, dict | TargetBase) else "layers"),
    ]


#: The target budget of the built-in metrics; `isinstance(budget, TargetBase)` holds for every target.
Target = target_model()
Budget = _budget(Target)


class Search(_Strict):
    """How quality targets are resolved: PyTorch forward passes of the pruned model on this much text."""

    text: str = "wiki"
    ctx: int = Field(256, ge=8)
    max_tokens: int = Field(1024, ge=8)
    threads: int = Field(2, ge=0)


class _Exports(_Strict):
    @model_validator(mode="after")
    def _some(self) -> _Exports:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError(f"name at least one export: {' or '.join(type(self).model_fields)}")
        return self


@functools.cache
def _exports_model(targets: tuple[tuple[str, type[BaseModel]], ...]) -> type[_Exports]:
    return create_model(
        "Exports",
        __base__=_Exports,
        __doc__="The artifacts of every variant: one entry per export target.",
        **{name: (options | None, None) for name, options in targets},
    )


def exports_model() -> type[_Exports]:
    """The ``exports`` model of the targets registered now: one optional entry per export target, each the
    target's own options model (`exporters.targets`); built once per registry contents."""
    return _exports_model(tuple((name, target.options) for name, target in TARGETS.items()))


class Validation(ValidationSettings):
    """What every variant is measured on, against the unpruned source model: `gatenorm validate`'s settings
    (`gatenorm.validate.settings.ValidationSettings`, the same defaults) plus whether to run at all."""

    enabled: bool = True
    fail_on_gates: bool = Field(
        False, description="Exit 1 when a variant fails a gate (else: reported only)."
    )


class Recipe(_Strict):
    """A batch: every model x method x budget x export, validated, in one output folder."""

    name: str | None = None
    output: str | None = Field(None, description="Output folder (default: out/<name>); -o overrides it.")
    models: list[Annotated[ModelEntry, BeforeValidator(_short("path"))]] = Field(min_length=1)
    methods: list[Annotated[MethodEntry, BeforeValidator(_short("name"))]] = Field(
        default_factory=lambda: [MethodEntry(name="gate-norm")], min_length=1
    )
    budgets: list[Budget] = Field(min_length=1)
    allow_first_layer: bool = False
    exports: _Exports = Field(description="The artifacts of every variant: one entry per export target.")
    validation: Validation = Field(default_factory=Validation)
    search: Search = Field(default_factory=Search)
    jobs: int = Field(1, ge=1, description="Variants built at once (--jobs overrides it).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _check_name(value)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Recipe:
        """Validate `obj` against the recipe of the registries as they are now (`recipe_model`)."""
        if cls is Recipe:
            return recipe_model().model_validate(obj, **kwargs)
        return super().model_validate(obj, **kwargs)


@functools.cache
def _recipe_model(exports: type[_Exports], gates: type[BaseModel], target: type[TargetBase]) -> type[Recipe]:
    validation = with_gates(Validation, gates)
    return create_model(
        "Recipe",
        __base__=Recipe,
        __doc__=Recipe.__doc__,
        exports=(exports, ...),
        validation=(validation, Field(default_factory=validation)),
        budgets=(list[_budget(target)], Field(min_length=1)),
    )


def recipe_model() -> type[Recipe]:
    """`Recipe` with the ``exports`` of the export targets registered now (`exports_model`) and the gates
    and target budgets of the metrics registered now (`gates_model`, `target_model`); methods are looked
    up in `METHODS` as a recipe is validated. A target, metric or method registered after import is
    accepted without rebuilding anything by hand."""
    return _recipe_model(exports_model(), gates_model(), target_model())
