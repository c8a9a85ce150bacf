"""The method registry: every method's `MethodSpec`, found by name; ranking, layer choice and plans.

The method modules are imported here, at the top, and register themselves with
`gatenorm.methods.spec.register_method`; everything else (the CLI's choices and help, the recipe schema,
the study, the tests) reads `METHODS` / `method_spec`. A new method is one decorated function in a module
imported below.
"""

from __future__ import annotations

import dataclasses
import time
from enum import Enum

import gatenorm.methods.score_only  # noqa: F401  (first: the score-only methods lead every listing)
from gatenorm.errors import GatenormError
from gatenorm.heal.forms import mapped_layers
from gatenorm.methods import data_driven, data_free  # noqa: F401  (the method modules register themselves)
from gatenorm.methods.cost import Phase, cost_model
from gatenorm.methods.spec import SPECS, MethodOptions, MethodSpec, Ranking
from gatenorm.plan import LayerAction, Plan, lowest_scored, plan_from_actions
from gatenorm.readers import Checkpoint
from gatenorm.scoring import LayerScores

#: Every registered method by name (the live table: a method registered later appears here too).
METHODS: dict[str, MethodSpec] = SPECS

#: The built-in methods' names as an enum (``Method.GATE_NORM == "gate-norm"``), made from the registry.
Method = Enum("Method", {name.upper().replace("-", "_"): name for name in SPECS}, type=str)


def method_names() -> list[str]:
    """Names of every registered method, in registration order."""
    return list(METHODS)


def method_spec(method: str) -> MethodSpec:
    """The spec of `method` (a name or `Method` member); one line naming the known ones if unknown."""
    name = str(getattr(method, "value", method))
    spec = METHODS.get(name)
    if spec is None:
        raise GatenormError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return spec


#: Methods that read only q/k (or nothing): they rank a checkpoint with layers already without attention.
WEIGHT_ONLY = (Method.GATE_NORM, Method.GATE_NORM_HEAD, Method.RANDOM, Method.LAST)


def rank_layers(
    ckpt: Checkpoint, method: Method | str, options: MethodOptions | None = None, needed: int | None = None
) -> Ranking:
    """Rank `ckpt`'s layers with `method`; `needed` (at most this many layers will be changed) lets HARP's
    calibration search only the layers it will linearize. `scores.seconds` is the whole ranking time."""
    spec = method_spec(method)
    if ckpt.fixed_layers and spec.name not in {m.value for m in WEIGHT_ONLY}:
        raise GatenormError(
            f"--method {spec.name} on {ckpt.path}: its layers without attention are not run by "
            f"the calibration passes yet; what works: {', '.join(m.value for m in WEIGHT_ONLY)}"
        )
    options = options or MethodOptions()
    if options.calib is None and spec.data:
        raise GatenormError(
            f"--method {spec.name} needs calibration text: give --calib FILE (or wiki-heldout)"
        )
    if options.calib is None and spec.default_calib is not None:
        options = dataclasses.replace(options, calib=spec.default_calib)
    start = time.perf_counter()
    ranking = spec.rank(ckpt, options, needed)
    ranking.scores.seconds = time.perf_counter() - start
    return ranking


def chosen_layers(
    ckpt: Checkpoint,
    ranking: Ranking,
    budget: int | None,
    speedup: float | None,
    ctx: int,
    allow_first_layer: bool = False,
    phase: Phase = "prefill",
    heal: str | None = None,
) -> list[int]:
    """The layers to change: the `budget` lowest-ranked, or the fewest lowest-ranked whose actions reach the
    estimated `speedup` (cost model of `phase` at context `ctx`; `heal`, a healing form: the fitted maps
    it gives counted)."""
    if (budget is None) == (speedup is None):
        raise GatenormError("give exactly one of a budget in layers (--drop N) and --budget-speedup X")
    if budget is not None:
        return lowest_scored(ckpt, ranking.scores, budget, allow_first_layer)
    if not speedup > 1.0:
        raise GatenormError(f"--budget-speedup {speedup}: a speedup target must be above 1")
    model = cost_model(ckpt, ctx, phase)
    order = lowest_scored(ckpt, ranking.scores, ckpt.shape.n_layers - 1 - len(ckpt.fixed_layers))
    actions = [LayerAction.KEEP] * ckpt.shape.n_layers
    for layer, (action, _) in ckpt.fixed_layers.items():  # the speedup is over the file as it is
        actions[layer] = LayerAction(action)
    base = model.flops(actions)
    repaired: set[int] = set()

    def gain() -> float:
        return base / model.flops(actions, repaired)

    for n, layer in enumerate(order, start=1):
        actions[layer] = ranking.actions[layer]
        if heal is not None:
            repaired = mapped_layers(actions, heal)
        if gain() >= speedup:
            return order[:n]
    best, name = gain(), ranking.scores.method + (f" healed ({heal})" if heal else "")
    raise GatenormError(f"estimated speedup {speedup} is out of reach: {name} reaches at most {best:.3f}")


def make_method_plan(
    ckpt: Checkpoint,
    method: Method | str,
    budget: int | None = None,
    speedup: float | None = None,
    options: MethodOptions | None = None,
    ranking: Ranking | None = None,
    allow_first_layer: bool = False,
) -> Plan:
    """The plan of `method` for `budget` changed layers or an estimated `speedup` (reuses `ranking` if
    given: a ranking made once serves every budget)."""
    options = options or MethodOptions()
    name = method_spec(method).name
    if ranking is None:
        ranking = rank_layers(ckpt, method, options, budget)
    chosen = set(
        chosen_layers(
            ckpt, ranking, budget, speedup, options.ctx, allow_first_layer, options.speedup_for, options.heal
        )
    )
    actions = [ranking.actions[i] if i in chosen else LayerAction.KEEP for i in range(ckpt.shape.n_layers)]
    missing = [i for i in chosen if actions[i] is LayerAction.LINEARIZE and i not in ranking.alphas]
    if missing:
        raise GatenormError(f"{name}: no alpha for layers {missing}; rank with a larger budget")
    plan = plan_from_actions(ckpt, ranking.scores, actions, ranking.alphas, name)
    spec = method_spec(method)
    calib = (options.calib or spec.default_calib) if (spec.data or spec.default_calib) else None
    return (
        plan
        if calib is None
        else plan.model_copy(update={"calibration": calib.record(options.seed, ckpt.path)})
    )


def score_checkpoint(ckpt: Checkpoint, method: str, seed: int = 0) -> LayerScores:
    """The scores of a score-only method (gate-norm, gate-norm-head, random, last); other methods plan
    through `rank_layers`."""
    spec = method_spec(method)
    if not spec.score_only:
        raise GatenormError(f"{spec.name} is ranked by gatenorm.methods.rank_layers, not score_checkpoint")
    return rank_layers(ckpt, spec.name, MethodOptions(seed=seed)).scores
