"""The batch plan: every variant (model x method x budget x export) of a recipe, each with a content key.

A variant's key is the sha256 of everything its artifact depends on (source content, plan JSON, export
settings, tool version): an artifact whose stored key matches is not built again. Validation has its own
key (the artifact's key, the measurement settings, the reference), so changing the validation settings
re-measures without re-exporting."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

from exporters.targets import TARGETS, target_spec
from gatenorm import __version__
from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings
from gatenorm.io import atomic_write_text, content_sha256
from gatenorm.methods import MethodSettings, Ranking, make_method_plan, method_spec, rank_layers
from gatenorm.plan import Plan
from gatenorm.readers import Checkpoint
from gatenorm.recipes.schema import MethodEntry, Recipe, TargetBase, Validation
from gatenorm.recipes.sources import ResolvedSource, resolve_source
from gatenorm.recover.settings import RecoverySettings

if TYPE_CHECKING:
    import numpy as np
    from torch.nn import Module

    from gatenorm.sequential import SequentialModel

KEY_SCHEMA = 1
#: The folder of the plan cache where healed plans and their repair weights are kept, by content key.
HEALED = "healed"


class ExportSpec(BaseModel):
    """One export of a plan: target format, quant type or precision, and the target's options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str  # gguf | onnx
    quant: str
    options: dict[str, int | bool] = {}

    @property
    def label(self) -> str:
        return f"{self.target}-{self.quant}"


class ValidationJob(BaseModel):
    """How one variant is validated: the reference model and runtime, and the recipe's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: str
    reference_runtime: str
    runtime: str
    settings: Validation
    key: str


class Variant(BaseModel):
    """One artifact of the batch and everything needed to build, validate and describe it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str
    source_path: str
    source_sha256: str
    method: str | None  # None: the unpruned baseline (budget 0), shared by every method
    budget: int
    target: str | None = None  # the target budget this was searched for, e.g. "max_kld=0.3"
    plan: str  # the plan JSON (a healed plan names its weights file by absolute path)
    export: ExportSpec
    key: str
    validation: ValidationJob | None
    #: the method heals its plans; `heal_pending`: not fitted yet (a dry run fits nothing)
    healed: bool = False
    heal_pending: bool = False

    @property
    def folder(self) -> str:
        """The variant's folder, relative to the output folder."""
        return self.name

    @property
    def artifact(self) -> str:
        """The exported model, relative to the output folder: a GGUF file, or an ONNX folder."""
        return f"{self.name}/{target_spec(self.export.target).artifact(self.name)}"

    def load_plan(self) -> Plan:
        return Plan.from_json(self.plan)


def digest(doc: dict) -> str:
    """sha256 of a JSON document with sorted keys (the content key of whatever it describes)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _text_id(text: str) -> str:
    """A text setting as it enters a key: 'wiki' (versioned by the package) or a file's content hash."""
    return text if text == "wiki" else f"sha256:{content_sha256(Path(text))}"


def artifact_key(source_sha256: str, plan_json: str, export: ExportSpec) -> str:
    """The content key of an artifact: source content, plan (a healed plan's repair hashes and fitting
    settings, not where its weights file is or how long the fit took), export settings, tool version."""
    plan = json.loads(plan_json)
    for field in ("healing", "recovery"):
        if plan.get(field):
            plan[field] = {k: v for k, v in plan[field].items() if k not in ("weights", "seconds")}
    return digest(
        {
            "key_schema": KEY_SCHEMA,
            "source_sha256": source_sha256,
            "plan": plan,
            "export": export.model_dump(),
            "tool_version": __version__,
        }
    )


def _ladder(recipe: Recipe) -> list[ExportSpec]:
    """GGUF quant types exported for the unpruned model only (the quantization ladder)."""
    return [
        ExportSpec(target=name, quant=q)
        for name, options in _targets(recipe)
        for q in TARGETS[name].ladder(options)
    ]


def _targets(recipe: Recipe) -> list[tuple[str, BaseModel]]:
    """(target name, its ``exports`` entry) of every target the recipe names, in registry order."""
    return [(n, o) for n in TARGETS if (o := getattr(recipe.exports, n, None)) is not None]


def _exports(recipe: Recipe) -> list[ExportSpec]:
    return [
        ExportSpec(target=name, quant=quant, options=exporter_options)
        for name, options in _targets(recipe)
        for quant, exporter_options in TARGETS[name].variants(options)
    ]


def reference_of(source: ResolvedSource, export: ExportSpec) -> tuple[str, str, str]:
    """(reference runtime, candidate runtime) of a variant: what a user of that format wants compared.

    GGUF variants run in llama.cpp against the source in llama.cpp (a GGUF source; an HF folder runs in
    PyTorch); ONNX variants run in onnxruntime against the source in PyTorch (its exact weights, dequantized
    from a GGUF). Either way the figures include both the pruning and the precision loss of the export."""
    return str(source.path), *target_spec(export.target).runtimes(source.is_gguf)


def _validation(source: ResolvedSource, export: ExportSpec, key: str, recipe: Recipe) -> ValidationJob | None:
    settings = recipe.validation
    if not settings.enabled:
        return None
    reference, ref_runtime, runtime = reference_of(source, export)
    measured = settings.model_dump(exclude={"gates", "fail_on_gates"})  # gates are re-read from the report
    vkey = digest(
        {
            "artifact": key,
            "reference": [source.sha256, ref_runtime],
            "settings": measured,
            "text": _text_id(settings.text),
            "tool_version": __version__,
        }
    )
    return ValidationJob(
        reference=reference, reference_runtime=ref_runtime, runtime=runtime, settings=settings, key=vkey
    )


def rank_with(ckpt: Checkpoint, method: MethodEntry) -> Ranking:
    """Rank `ckpt`'s layers with a recipe's method entry (`gatenorm.methods.rank_layers`)."""
    options = method_settings(method).method_options(heal=method.heal_settings and method.heal_settings.form)
    return rank_layers(ckpt, method.name, options)


def method_settings(method: MethodEntry) -> MethodSettings:
    """A recipe method entry's settings: its ``options`` (checked against the method's options model), and
    the settings the entry gives beside them (seed, calib)."""
    model = method_spec(method.name).options
    beside = {
        name: getattr(method, name) for name in model.model_fields.keys() & MethodEntry.model_fields.keys()
    }
    known = sorted(model.model_fields.keys() - beside.keys())
    unknown = sorted(set(method.options) - set(known))
    if unknown:
        raise GatenormError(
            f"method {method.name} takes no option(s) {', '.join(unknown)} (known: {', '.join(known)})"
        )
    try:
        return model.model_validate({**method.options, **beside})
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise GatenormError(f"method {method.name}: options.{where}: {error['msg']}") from None


def _method_labels(methods: list[MethodEntry]) -> list[str]:
    """The method part of variant names: the name, with the seed when two entries share a name and
    healing and recovery, and ``-healed`` / ``-recovered`` for a healed / recovered entry."""
    names = [(m.name, m.heal_settings is not None, m.recover_settings is not None) for m in methods]
    labels = [
        (f"{m.name}-s{m.seed}" if names.count(n) > 1 else m.name)
        + ("-healed" if n[1] else "")
        + ("-recovered" if n[2] else "")
        for m, n in zip(methods, names, strict=True)
    ]
    if len(set(labels)) != len(labels):
        raise GatenormError(f"methods {', '.join(labels)} repeat; give repeated methods different seeds")
    return labels


def _variant_name(model: str, method: str | None, budget: int, export: ExportSpec) -> str:
    middle = f"{method}-d{budget:02d}" if method else f"d{budget:02d}"
    return f"{model}-{middle}-{export.label}"


class ResolvedBudget(BaseModel):
    """One budget of a model x method, resolved: the number of changed layers and the plan JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int
    plan: str
    #: a healed method's budget whose repairs are not fitted yet (`plan` is the unhealed plan)
    heal_pending: bool = False


def plans_key(source: ResolvedSource, method: MethodEntry, recipe: Recipe) -> str:
    """The content key of a model x method's plans: everything scoring, target search and planning read."""
    targets = {b.kind for b in recipe.budgets if isinstance(b, TargetBase)}
    searched = bool(targets - {"min_speedup"})  # quality targets: PyTorch passes on the search text
    search = [recipe.search.model_dump(mode="json"), _text_id(recipe.search.text)] if searched else None
    entry = method.model_dump(mode="json") | {
        "heal": _heal_id(method.heal_settings),
        "recover": _heal_id(method.recover_settings),
    }
    return digest(
        {
            "key_schema": KEY_SCHEMA,
            "source_sha256": source.sha256,
            "method": entry,
            "budgets": [
                b.model_dump(mode="json") if isinstance(b, TargetBase) else b for b in recipe.budgets
            ],
            "allow_first_layer": recipe.allow_first_layer,
            "search": search,
            "speedup_ctx": recipe.validation.ctx if "min_speedup" in targets else None,  # the cost model's
            "tool_version": __version__,
        }
    )


def _heal_id(settings: HealSettings | RecoverySettings | None) -> dict | None:
    """Healing or recovery settings as they enter a key (a calibration file by its content hash); None:
    not healed / recovered."""
    if settings is None:
        return None
    return settings.model_dump(mode="json") | {"calib": settings.calib_id()}


def _cached_plans(path: Path) -> dict[str, ResolvedBudget] | None:
    """The plans stored at `path`, or None when there are none (or they no longer parse, or a healed
    plan's weights file is gone or changed)."""
    from gatenorm.heal.store import load_repairs
    from gatenorm.recover.store import load_overrides

    try:
        doc = json.loads(path.read_text())
        plans = {label: ResolvedBudget.model_validate(entry) for label, entry in doc.items()}
        for resolved in plans.values():
            load_repairs(Plan.from_json(resolved.plan))
            load_overrides(Plan.from_json(resolved.plan))
        return plans
    except (OSError, ValueError, GatenormError):
        return None


class _HealInputs:
    """One source's layer-sequential model and calibration windows, made on first use and shared by every
    plan of it that a run heals (its budgets and methods): one sampling of the text per calibration, not
    one per healed plan."""

    def __init__(self, source: ResolvedSource, log: Callable[[str], None]):
        self.source, self.log = source, log
        self.model: SequentialModel | None = None
        self.whole: Module | None = None  # loaded only for a recovery
        self.windows: dict[tuple, np.ndarray] = {}

    def get(self, settings: HealSettings | RecoverySettings) -> tuple[SequentialModel | Module, np.ndarray]:
        """(the model: its `SequentialModel` for healing, the whole float32 model for a recovery's training;
        `settings`' calibration windows of it)."""
        from gatenorm.apply import load_model
        from gatenorm.sequential import SequentialModel

        if isinstance(settings, RecoverySettings):
            if self.whole is None:
                self.whole = load_model(self.source.path)
            return self.whole, self.windows_of(settings)

        if self.model is None:
            self.model = SequentialModel(self.source.path)
        return self.model, self.windows_of(settings)

    def windows_of(self, settings: HealSettings | RecoverySettings) -> np.ndarray:
        key = (settings.calib_id(), settings.samples, settings.length, settings.seed)
        if key not in self.windows:
            start = time.perf_counter()
            self.windows[key] = windows = settings.windows(self.source.path, self.log)
            self.log(
                f"{self.source.name}: {windows.shape[0]} x {windows.shape[1]} {settings.calib} calibration "
                f"tokens in {time.perf_counter() - start:.0f} s, for every plan healed on them"
            )
        return self.windows[key]


def _healed_plan(
    source: ResolvedSource,
    plan: Plan,
    settings: HealSettings | RecoverySettings,
    cache: Path | None,
    store: bool,
    log: Callable[[str], None],
    inputs: _HealInputs,
) -> Plan | None:
    """`plan` healed (`HealSettings`) or recovered (`RecoverySettings`) with `settings`: from the plan cache
    (``healed/<key>.json`` beside its weights file, keyed by the plan and the settings, so a rerun reuses
    it), else fitted and stored there; None when it is not there and nothing may be written (a dry run)."""
    from gatenorm.heal import store as heal_store
    from gatenorm.heal.fit import heal_plan
    from gatenorm.recover import store as recover_store
    from gatenorm.recover.train import recover_plan

    recover = isinstance(settings, RecoverySettings)
    key = digest(
        {
            "key_schema": KEY_SCHEMA,
            "source_sha256": source.sha256,
            "plan": json.loads(plan.to_json()),
            "recover" if recover else "heal": _heal_id(settings),
            "tool_version": __version__,
        }
    )
    stored = None if cache is None else cache / HEALED / f"{key}.json"
    if stored is not None and stored.is_file():
        try:
            cached = Plan.load(stored)
            heal_store.load_repairs(cached)
            recover_store.load_overrides(cached)
            return cached
        except GatenormError:
            pass  # gone or changed: fit again
    if stored is None or not store:
        return None
    model, windows = inputs.get(settings)
    if recover:
        weights = recover_store.weights_path_for(stored)
        fitted = recover_plan(source.path, plan, settings, weights, log, None, model, windows)
    else:
        fitted = heal_plan(
            source.path, plan, settings, heal_store.weights_path_for(stored), log, model, windows
        )
    fitted.save(stored)
    return fitted


def _method_plans(
    source: ResolvedSource,
    ckpt: Checkpoint,
    method: MethodEntry,
    recipe: Recipe,
    log: Callable[[str], None],
    cache: Path | None,
    store: bool,
    heal_inputs: _HealInputs,
) -> dict[str, ResolvedBudget]:
    """Budget label -> resolved budget of one model x method, from `cache` when its key is stored there
    (and stored there when made, with `store`)."""
    from gatenorm.recipes.search import resolve_target

    stored = None if cache is None else cache / f"{plans_key(source, method, recipe)}.json"
    if stored is not None and (plans := _cached_plans(stored)) is not None:
        return plans
    ranking = rank_with(ckpt, method)
    heal = method.heal_settings
    plans = {}
    for budget in recipe.budgets:
        if isinstance(budget, TargetBase):
            if method.recover_settings is not None and budget.kind != "min_speedup":
                raise GatenormError(
                    f"budget {budget.label} of {source.name} / {method.name}: recovered methods take layer "
                    "counts and min_speedup targets (a quality search would train at every step)"
                )
            n, label = resolve_target(source, ckpt, ranking, budget, recipe, log, heal), budget.label
        else:
            n, label = budget, str(budget)
        try:
            plan = make_method_plan(
                ckpt, method.name, budget=n, ranking=ranking, allow_first_layer=recipe.allow_first_layer
            ).from_hub(source.hub)
        except GatenormError as e:
            raise GatenormError(f"{source.name}: {str(e).replace('--drop', 'budget')}") from None
        pending = False
        for settings in (heal, method.recover_settings):  # budget 0 is the shared, unhealed baseline
            if settings is not None and n and not pending:
                fitted = _healed_plan(source, plan, settings, cache, store, log, heal_inputs)
                pending = fitted is None
                plan = plan if pending else fitted
        plans[label] = ResolvedBudget(n=n, plan=plan.to_json(), heal_pending=pending)
    if any(p.heal_pending for p in plans.values()):
        return plans  # not complete: never cached
    if stored is not None and store:
        atomic_write_text(stored, json.dumps({b: p.model_dump() for b, p in plans.items()}) + "\n")
    return plans


class BatchPlan(BaseModel):
    """The whole batch, planned before any artifact is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe_name: str
    variants: list[Variant]
    #: (model, method) -> {budget label: number of layers}; target budgets show what they resolved to
    budgets: dict[str, dict[str, int]]


def plan_batch(
    recipe: Recipe,
    name: str,
    log: Callable[[str], None] = lambda _: None,
    cache: Path | None = None,
    store: bool = True,
) -> BatchPlan:
    """Resolve the sources, score them, resolve target budgets and make every variant's plan and keys.

    With `cache` (a folder), each model x method's plans are stored under their content key
    (`plans_key`; not written without `store`) and reused by a later run whose inputs are the same, so
    an unchanged recipe is not scored again. Raises a GatenormError (before anything is built) on a
    missing model, a bad budget or option."""
    from exporters.export import open_model

    exports = _exports(recipe)
    labels = _method_labels(recipe.methods)
    sources = [resolve_source(entry) for entry in recipe.models]
    seen = [s.name for s in sources]
    if len(set(seen)) != len(seen):
        raise GatenormError(
            f"models share a name ({', '.join(seen)}); give each its own `name:` in the recipe"
        )
    variants: dict[str, Variant] = {}
    budgets: dict[str, dict[str, int]] = {}
    for source in sources:
        ckpt = open_model(source.path)
        log(f"{source.name}: {source.path} ({ckpt.shape.n_layers} layers, sha256 {source.sha256[:12]})")
        heal_inputs = _HealInputs(source, log)
        for method, label in zip(recipe.methods, labels, strict=True):
            plans = _method_plans(source, ckpt, method, recipe, log, cache, store, heal_inputs)
            budgets[f"{source.name} / {label}"] = {b: p.n for b, p in plans.items()}
            for budget_label, resolved in plans.items():
                n = resolved.n
                target = None if budget_label.isdigit() else budget_label
                shown_method = label if n else None
                for export in exports + (_ladder(recipe) if n == 0 else []):
                    vname = _variant_name(source.name, shown_method, n, export)
                    if vname in variants:  # budget 0 of a second method, or a target equal to a budget
                        continue
                    key = artifact_key(source.sha256, resolved.plan, export)
                    if resolved.heal_pending:  # the fitted plan's key is not known yet
                        key = digest(
                            {
                                "pending": key,
                                "heal": _heal_id(method.heal_settings),
                                "recover": _heal_id(method.recover_settings),
                            }
                        )
                    variants[vname] = Variant(
                        name=vname,
                        model=source.name,
                        source_path=str(source.path),
                        source_sha256=source.sha256,
                        method=shown_method,
                        budget=n,
                        target=target,
                        plan=resolved.plan,
                        export=export,
                        key=key,
                        validation=_validation(source, export, key, recipe),
                        healed=bool(n) and method.heal_settings is not None,
                        heal_pending=resolved.heal_pending,
                    )
    return BatchPlan(recipe_name=name, variants=list(variants.values()), budgets=budgets)
