"""The method registry: name -> how the method ranks layers and what it does to the chosen ones."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gatenorm.errors import GatenormError
from gatenorm.methods.calibration import Calibration
from gatenorm.methods.cost import Phase, cost_model
from gatenorm.plan import LayerAction, Plan, lowest_scored, plan_from_actions
from gatenorm.readers import Checkpoint
from gatenorm.scoring import LayerScores, Method, score_checkpoint


@dataclass(frozen=True)
class MethodOptions:
    """Settings a method may use: the seed (random), calibration text (data-driven methods), and the context
    length of the cost model and of the data-free alpha."""

    seed: int = 0
    calib: Calibration | None = None
    ctx: int = 512
    #: what an estimated speedup target is about: a prompt of `ctx` tokens, or decoding at depth `ctx`
    speedup_for: Phase = "prefill"
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


@dataclass(frozen=True)
class MethodInfo:
    """One registry entry: does the method need calibration text, and how it ranks (given how many layers
    at most will be changed, which lets HARP's search stop early)."""

    name: Method
    data: bool
    rank: Callable[[Checkpoint, MethodOptions, int | None], Ranking]
    summary: str


def _weight_method(method: Method) -> Callable[[Checkpoint, MethodOptions, int | None], Ranking]:
    def rank(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
        scores = score_checkpoint(ckpt, method, options.seed)
        return Ranking(scores, [LayerAction.DROP_ATTENTION] * ckpt.shape.n_layers)

    return rank


def _data_method(name: str) -> Callable[[Checkpoint, MethodOptions, int | None], Ranking]:
    def rank(ckpt: Checkpoint, options: MethodOptions, needed: int | None) -> Ranking:
        from gatenorm.methods import data_driven

        if options.calib is None:
            raise GatenormError(
                f"--method {name} needs calibration text: give --calib FILE (or wiki-heldout)"
            )
        return getattr(data_driven, name.replace("-", "_"))(ckpt, options, needed)

    return rank


def _data_free(name: str) -> Callable[[Checkpoint, MethodOptions, int | None], Ranking]:
    def rank(ckpt: Checkpoint, options: MethodOptions, needed: int | None) -> Ranking:
        from gatenorm.methods import data_free

        return getattr(data_free, name.replace("-", "_"))(ckpt, options, needed)

    return rank


METHODS: dict[Method, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(Method.GATE_NORM, False, _weight_method(Method.GATE_NORM), "Gate-Norm ||W_q W_k^T||_F"),
        MethodInfo(Method.GATE_NORM_HEAD, False, _weight_method(Method.GATE_NORM_HEAD), "per-head Gate-Norm"),
        MethodInfo(Method.RANDOM, False, _weight_method(Method.RANDOM), "seeded random order"),
        MethodInfo(Method.LAST, False, _weight_method(Method.LAST), "deepest layers first"),
        MethodInfo(
            Method.ATTENTION_COSINE, True, _data_method("attention-cosine"), "LLM-Drop attention drop"
        ),
        MethodInfo(Method.BLOCK_INFLUENCE, True, _data_method("block-influence"), "ShortGPT block removal"),
        MethodInfo(Method.HARP, True, _data_method("harp"), "HARP: linearize top layers, calibrated alpha"),
        MethodInfo(Method.HARP_FREE, False, _data_free("harp-free"), "HARP with the data-free alpha"),
        MethodInfo(Method.MIXED, False, _data_free("mixed"), "data-free keep/drop/linearize per layer"),
        MethodInfo(
            Method.MIXED_SYNTHETIC,
            False,
            _data_free("mixed-synthetic"),
            "keep/drop/linearize/drop-block by measured damage on self-generated text (no data)",
        ),
    )
}


#: Methods that read only q/k (or nothing): they rank a checkpoint with layers already without attention.
WEIGHT_ONLY = (Method.GATE_NORM, Method.GATE_NORM_HEAD, Method.RANDOM, Method.LAST)


def rank_layers(
    ckpt: Checkpoint, method: Method | str, options: MethodOptions | None = None, needed: int | None = None
) -> Ranking:
    """Rank `ckpt`'s layers with `method`; `needed` (at most this many layers will be changed) lets HARP's
    calibration search only the layers it will linearize. `scores.seconds` is the whole ranking time."""
    if ckpt.fixed_layers and Method(method) not in WEIGHT_ONLY:
        raise GatenormError(
            f"--method {Method(method).value} on {ckpt.path}: its layers without attention are not run by "
            f"the calibration passes yet; what works: {', '.join(m.value for m in WEIGHT_ONLY)}"
        )
    start = time.perf_counter()
    ranking = METHODS[Method(method)].rank(ckpt, options or MethodOptions(), needed)
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
) -> list[int]:
    """The layers to change: the `budget` lowest-ranked, or the fewest lowest-ranked whose actions reach the
    estimated `speedup` (cost model of `phase` at context `ctx`)."""
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

    def gain() -> float:
        return base / model.flops(actions)

    for n, layer in enumerate(order, start=1):
        actions[layer] = ranking.actions[layer]
        if gain() >= speedup:
            return order[:n]
    best, name = gain(), ranking.scores.method.value
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
    if ranking is None:
        ranking = rank_layers(ckpt, method, options, budget)
    chosen = set(
        chosen_layers(ckpt, ranking, budget, speedup, options.ctx, allow_first_layer, options.speedup_for)
    )
    actions = [ranking.actions[i] if i in chosen else LayerAction.KEEP for i in range(ckpt.shape.n_layers)]
    missing = [i for i in chosen if actions[i] is LayerAction.LINEARIZE and i not in ranking.alphas]
    if missing:
        raise GatenormError(
            f"{Method(method).value}: no alpha for layers {missing}; rank with a larger budget"
        )
    return plan_from_actions(ckpt, ranking.scores, actions, ranking.alphas, Method(method).value)
