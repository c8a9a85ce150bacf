"""Methods that only score layers and drop the attention of the lowest: Gate-Norm (whole layer, per head)
and the two baselines (a seeded draw, depth). They read at most the q/k weights."""

from __future__ import annotations

from gatenorm.methods.spec import MethodOptions, Ranking, register_method
from gatenorm.plan import LayerAction
from gatenorm.readers import Checkpoint
from gatenorm.scoring import (
    LayerScores,
    depth_scores,
    gate_norm,
    gate_norm_head,
    seeded_scores,
    shape_scores,
    weight_scores,
)

_DROP = {LayerAction.DROP_ATTENTION}


def _dropping(ckpt: Checkpoint, scores: LayerScores) -> Ranking:
    return Ranking(scores, [LayerAction.DROP_ATTENTION] * ckpt.shape.n_layers)


@register_method(
    "gate-norm", label="Gate-Norm", summary="Gate-Norm ||W_q W_k^T||_F", actions=_DROP, score_only=True
)
def gate_norm_rank(ckpt: Checkpoint, _options: MethodOptions, _needed: int | None) -> Ranking:
    """Gate-Norm of every layer's q/k (`gatenorm.scoring.gate_norm`)."""
    return _dropping(ckpt, weight_scores(ckpt, "gate-norm", gate_norm))


@register_method(
    "gate-norm-head",
    label="Gate-Norm per head",
    summary="per-head Gate-Norm",
    actions=_DROP,
    score_only=True,
    in_study=False,
)
def gate_norm_head_rank(ckpt: Checkpoint, _options: MethodOptions, _needed: int | None) -> Ranking:
    """The per-head Gate-Norm of every layer (`gatenorm.scoring.gate_norm_head`)."""
    return _dropping(ckpt, weight_scores(ckpt, "gate-norm-head", gate_norm_head))


@register_method("random", label="random", summary="seeded random order", actions=_DROP, score_only=True)
def random_rank(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
    """A seeded uniform draw per layer (`options.seed`)."""
    n = ckpt.shape.n_layers
    return _dropping(ckpt, shape_scores(ckpt, "random", seeded_scores(n, options.seed), options.seed))


@register_method("last", label="last", summary="deepest layers first", actions=_DROP, score_only=True)
def last_rank(ckpt: Checkpoint, _options: MethodOptions, _needed: int | None) -> Ranking:
    """Depth: the deepest layer is changed first."""
    return _dropping(ckpt, shape_scores(ckpt, "last", depth_scores(ckpt.shape.n_layers)))
