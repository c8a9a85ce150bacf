"""Data-free rankings that read more than q/k: HARP with the self-weight alpha, and the mixed plan.

The mixed plan (gatenorm's own): Gate-Norm picks which layers lose their Q/K coupling (lowest first). For a
chosen layer, dropping the attention loses its whole output (damage D) and saves the cost model's
c_drop FLOPs per token; linearizing at the data-free alpha (the least-squares fit, see
`gatenorm.methods.harp_alpha`) keeps a fraction ~alpha of it (damage ~(1 - alpha) D) and saves c_lin < c_drop.
The layer is linearized when that buys less damage per saved FLOP, (1 - alpha) / c_lin < 1 / c_drop, i.e.
alpha > 1 - c_lin / c_drop (about 0.3 for SmolLM2 at a 256-token context), else its attention is dropped.
"""

from __future__ import annotations

from gatenorm.methods.cost import cost_model
from gatenorm.methods.data_driven import depth_scores
from gatenorm.methods.registry import MethodOptions, Ranking
from gatenorm.methods.weights import WeightStatistics, weight_statistics
from gatenorm.plan import LayerAction
from gatenorm.readers import Checkpoint
from gatenorm.scoring import LayerScores, Method


def _extra(stats: WeightStatistics) -> dict[str, list[float]]:
    return {
        "gate_norm": stats.gate_norm,
        "alpha": stats.alpha,
        "self_weight": stats.self_weight,
        "shared": stats.shared,
        "value_gain": stats.value_gain,
    }


def _scores(stats: WeightStatistics, method: Method, values: list[float]) -> LayerScores:
    return LayerScores(method, values, stats.content_sha256, "attention-tensors", stats.seconds)


def harp_free(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
    """HARP's choice of layers (the highest) with alphas from the data-free self-weight rule."""
    stats = weight_statistics(ckpt, options.ctx)
    n = ckpt.shape.n_layers
    alphas = dict(enumerate(stats.alpha))
    scores = _scores(stats, Method.HARP_FREE, depth_scores(n))
    return Ranking(scores, [LayerAction.LINEARIZE] * n, alphas, _extra(stats))


def linearize_threshold(ckpt: Checkpoint, ctx: int) -> float:
    """1 - c_lin / c_drop: the alpha above which linearizing loses less per saved FLOP than dropping."""
    model = cost_model(ckpt, ctx)
    keep = model.layer(LayerAction.KEEP)
    saved_lin = keep - model.layer(LayerAction.LINEARIZE)
    saved_drop = keep - model.layer(LayerAction.DROP_ATTENTION)
    return 1.0 - saved_lin / saved_drop


def mixed(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
    """Gate-Norm order; linearize where the data-free alpha beats `linearize_threshold`, else drop."""
    stats = weight_statistics(ckpt, options.ctx)
    threshold = linearize_threshold(ckpt, options.ctx)
    linear = [a > threshold for a in stats.alpha]
    actions = [LayerAction.LINEARIZE if lin else LayerAction.DROP_ATTENTION for lin in linear]
    alphas = {i: a for i, (a, lin) in enumerate(zip(stats.alpha, linear, strict=True)) if lin}
    extra = {**_extra(stats), "linearize_threshold": [threshold]}
    return Ranking(_scores(stats, Method.MIXED, stats.gate_norm), actions, alphas, extra)
