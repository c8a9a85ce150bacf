"""Target budgets: turn "as many layers as keep KLD <= x" or "a speedup of at least y" into a layer count."""

from __future__ import annotations

from collections.abc import Callable

from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings
from gatenorm.methods import Ranking, make_method_plan
from gatenorm.methods.registry import chosen_layers
from gatenorm.readers import Checkpoint
from gatenorm.recipes.schema import Recipe, TargetBase
from gatenorm.recipes.sources import ResolvedSource


def _quality_probe(
    source: ResolvedSource, ckpt: Checkpoint, ranking: Ranking, recipe: Recipe, target: TargetBase
) -> Callable[[int], float]:
    """A function n -> the target's metric of the model with n layers dropped, against the unpruned one,
    in PyTorch on the recipe's search text (each probe one layer-at-a-time pass, `gatenorm.sequential`)."""
    from gatenorm.validate.agreement import compare_logits
    from gatenorm.validate.runtimes import TorchRuntime
    from gatenorm.validate.text import token_windows

    search = recipe.search
    ref = TorchRuntime(source.path, threads=search.threads)
    windows = token_windows(search.text, ref.tokenize, search.ctx, search.max_tokens, ref.bos_id)
    first = search.ctx // 2
    ref_logits = list(ref.window_logits(windows, first))
    metric = target.metric

    def probe(n: int) -> float:
        plan = make_method_plan(
            ckpt, ranking.scores.method, budget=n, ranking=ranking, allow_first_layer=recipe.allow_first_layer
        )
        cand = ref.with_plan(plan)  # a layer-at-a-time pass with the plan's modules; no copy of the model
        try:
            result = compare_logits(ref_logits, cand.window_logits(windows, first), windows, first)
        finally:
            cand.close()
        return metric.read(result)

    return probe


def resolve_target(
    source: ResolvedSource,
    ckpt: Checkpoint,
    ranking: Ranking,
    target: TargetBase,
    recipe: Recipe,
    log: Callable[[str], None] = lambda _: None,
    heal: HealSettings | None = None,
) -> int:
    """The number of layers a target budget asks for.

    Quality targets: the most layers (in the method's order) whose metric still meets the target, by
    bisection, assuming quality falls as layers go. `min_speedup`: the fewest layers whose method actions
    reach the target under the cost model (`gatenorm.methods.cost`) at the validation context, as
    `--budget-speedup` does (the report shows the measured speedup); with `heal`, every changed layer's
    repair counted. Quality targets of a healed method are refused (the probes would each need a fit)."""
    name = ranking.scores.method
    top = ckpt.shape.n_layers - 1  # make_plan's limit: one attention sublayer stays
    if target.kind == "min_speedup":
        try:
            ctx = recipe.validation.ctx if target.ctx is None else target.ctx
            n = len(
                chosen_layers(
                    ckpt, ranking, None, target.value, ctx, phase=target.speedup_for, heal=heal and heal.form
                )
            )
        except GatenormError as error:
            raise GatenormError(f"budget {target.label} of {source.name}: {error}") from None
        log(f"{source.name} / {name}: {target.label} -> {n} layers")
        return n
    if heal is not None:
        raise GatenormError(
            f"budget {target.label} of {source.name} / {name}: healed methods take layer counts and "
            "min_speedup targets (a quality search would fit repairs at every step)"
        )
    probe = _quality_probe(source, ckpt, ranking, recipe, target)
    metric = target.metric
    lo, hi = 0, top  # holds(lo) (nothing dropped); find the largest n that holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        value = probe(mid)
        log(f"{source.name} / {name}: {metric.name} with {mid} dropped: {value:.4g}")
        if metric.holds(value, target.value):
            lo = mid
        else:
            hi = mid - 1
    log(f"{source.name} / {name}: {target.label} -> {lo} layers")
    return lo
