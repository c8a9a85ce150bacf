"""Data-free rankings that read more than q/k: HARP with the self-weight alpha, the mixed plan from the
weights, and the mixed plan from text the model generates itself.

The mixed plan (gatenorm's own): Gate-Norm picks which layers lose their Q/K coupling (lowest first). For a
chosen layer, dropping the attention loses its whole output (damage D) and saves the cost model's
c_drop FLOPs per token; linearizing at the data-free alpha (the least-squares fit, see
`gatenorm.methods.harp_alpha`) keeps a fraction ~alpha of it (damage ~(1 - alpha) D) and saves c_lin < c_drop.
The layer is linearized when that buys less damage per saved FLOP, (1 - alpha) / c_lin < 1 / c_drop, i.e.
alpha > 1 - c_lin / c_drop (about 0.3 for SmolLM2 at a 256-token context), else its attention is dropped.

The mixed-synthetic plan (gatenorm's, no data but forward passes): calibrate on text sampled from the model
itself (by llama.cpp: `gatenorm.methods.synthetic`), measure per layer the damage of dropping its
attention, 1 - cos(X + A, X), of linearizing it at the least-squares alpha, 1 - cos(X + A, X + alpha L),
and of dropping the whole block, 1 - cos(block in, block out), and rank the layers by the smallest damage
per saved FLOP (cost model), taking the action that achieves it.
"""

from __future__ import annotations

from dataclasses import replace

from gatenorm.errors import GatenormError
from gatenorm.methods.calibration import SYNTHETIC, Calibration
from gatenorm.methods.cost import Phase, cost_model
from gatenorm.methods.data_driven import calibration_statistics
from gatenorm.methods.spec import MethodOptions, Ranking, per_layer_fields, register_method
from gatenorm.methods.weights import WeightStatistics, weight_statistics
from gatenorm.plan import LayerAction
from gatenorm.readers import Checkpoint
from gatenorm.scoring import LayerScores, depth_scores


def _scores(stats: WeightStatistics, method: str, values: list[float]) -> LayerScores:
    return LayerScores(method, values, stats.content_sha256, "attention-tensors", stats.seconds)


@register_method(
    "harp-free",
    label="HARP, data-free alpha (ours)",
    summary="HARP with the data-free alpha",
    actions={LayerAction.LINEARIZE},
)
def harp_free(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
    """HARP's choice of layers (the highest) with alphas from the data-free self-weight rule."""
    stats = weight_statistics(ckpt, options.ctx)
    n = ckpt.shape.n_layers
    alphas = dict(enumerate(stats.alpha))
    scores = _scores(stats, "harp-free", depth_scores(n))
    return Ranking(scores, [LayerAction.LINEARIZE] * n, alphas, per_layer_fields(stats))


def saved_flops(ckpt: Checkpoint, ctx: int, phase: Phase = "prefill") -> dict[LayerAction, float]:
    """Cost per token one layer saves with each pruning action (cost model of `phase` at context `ctx`)."""
    model = cost_model(ckpt, ctx, phase)
    keep = model.layer(LayerAction.KEEP)
    return {a: keep - model.layer(a) for a in LayerAction if a is not LayerAction.KEEP}


def linearize_threshold(ckpt: Checkpoint, ctx: int, phase: Phase = "prefill") -> float:
    """1 - c_lin / c_drop: the alpha above which linearizing loses less per saved FLOP than dropping."""
    saved = saved_flops(ckpt, ctx, phase)
    return 1.0 - saved[LayerAction.LINEARIZE] / saved[LayerAction.DROP_ATTENTION]


@register_method(
    "mixed",
    label="mixed (data-free, ours)",
    summary="data-free keep/drop/linearize per layer",
    actions={LayerAction.DROP_ATTENTION, LayerAction.LINEARIZE},
)
def mixed(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
    """Gate-Norm order; linearize where the data-free alpha beats `linearize_threshold`, else drop."""
    stats = weight_statistics(ckpt, options.ctx)
    threshold = linearize_threshold(ckpt, options.ctx, options.speedup_for)
    linear = [a > threshold for a in stats.alpha]
    actions = [LayerAction.LINEARIZE if lin else LayerAction.DROP_ATTENTION for lin in linear]
    alphas = {i: a for i, (a, lin) in enumerate(zip(stats.alpha, linear, strict=True)) if lin}
    extra = {**per_layer_fields(stats), "linearize_threshold": [threshold]}
    return Ranking(_scores(stats, "mixed", stats.gate_norm), actions, alphas, extra)


#: Self-generated calibration of mixed-synthetic when none is given: 8 windows of 256 tokens.
DEFAULT_SYNTHETIC = Calibration(SYNTHETIC, 8, 256)


@register_method(
    "mixed-synthetic",
    label="mixed, self-generated text (no data, ours)",
    summary="keep/drop/linearize/drop-block by measured damage on self-generated text (no data)",
    actions={LayerAction.DROP_ATTENTION, LayerAction.LINEARIZE, LayerAction.DROP_BLOCK},
    default_calib=DEFAULT_SYNTHETIC,
)
def mixed_synthetic(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
    """Rank by the smallest drop / linearize / drop-block damage per saved FLOP on self-generated text
    (module doc). Scores are in units of a dropped attention: 1 - cos(X + A, X) for a layer whose attention
    is dropped, a damage times c_drop / c_action for the other actions."""
    calib = options.calib or DEFAULT_SYNTHETIC  # the registry passes the default; direct calls too
    if calib.source != SYNTHETIC:
        raise GatenormError(
            f"--method mixed-synthetic calibrates on text the model generates; --calib {calib.source} is "
            "data (omit --calib or give --calib synthetic)"
        )
    stats, sha = calibration_statistics(ckpt, replace(options, calib=calib))
    saved = saved_flops(ckpt, options.ctx, options.speedup_for)
    cosines = {
        LayerAction.DROP_ATTENTION: stats.attention_cosine,
        LayerAction.LINEARIZE: stats.linear_cosine,
        LayerAction.DROP_BLOCK: stats.block_cosine,
    }
    scores, actions, alphas = [], [], {}
    for i in range(ckpt.shape.n_layers):
        per_flop = {
            a: (1.0 - c[i]) * saved[LayerAction.DROP_ATTENTION] / saved[a] for a, c in cosines.items()
        }
        action = min(per_flop, key=per_flop.__getitem__)
        scores.append(per_flop[action])
        actions.append(action)
        if action is LayerAction.LINEARIZE:
            alphas[i] = stats.linear_alpha[i]
    ranked = LayerScores("mixed-synthetic", scores, sha, "attention-tensors", 0.0, options.seed)
    return Ranking(ranked, actions, alphas, per_layer_fields(stats))
