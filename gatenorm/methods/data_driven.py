"""Data-driven rankings: LLM-Drop's attention cosine, ShortGPT's block influence, HARP's calibrated alpha.

Each runs the model a layer at a time (`gatenorm.sequential`) on the calibration text;
the plan records the same q/k content hash as a Gate-Norm plan, so exporters accept it for this model.
"""

from __future__ import annotations

import functools

import numpy as np

from gatenorm.methods.calibration import (
    LayerStatistics,
    SequentialTailRunner,
    sequential_layer_statistics,
)
from gatenorm.methods.harp_alpha import calibrate_alphas
from gatenorm.methods.spec import MethodOptions, Ranking, per_layer_fields, register_method
from gatenorm.plan import LayerAction
from gatenorm.readers import Checkpoint
from gatenorm.scoring import LayerScores, depth_scores
from gatenorm.sequential import SequentialModel


def _windows(ckpt: Checkpoint, options: MethodOptions) -> np.ndarray:
    """The calibration windows (synthetic text: sampled by llama.cpp, `gatenorm.methods.synthetic`)."""
    from gatenorm.apply import load_tokenizer

    windows = options.calib.windows(load_tokenizer(ckpt.path), ckpt.path, options.seed, options.log)
    options.log(
        f"calibration: {windows.shape[0]} windows of {windows.shape[1]} tokens from {options.calib.source}"
    )
    return windows


def _scores(ckpt: Checkpoint, method: str, values: list[float]) -> LayerScores:
    return LayerScores(method, values, ckpt.attention_sha256(("q", "k")), "attention-tensors", 0.0)


@functools.lru_cache(maxsize=2)
def calibration_statistics(ckpt: Checkpoint, options: MethodOptions) -> tuple[LayerStatistics, str]:
    """The calibration pass and the q/k hash, shared by attention-cosine, block-influence and
    mixed-synthetic (one pass per calibration)."""
    windows = _windows(ckpt, options)
    stats = sequential_layer_statistics(SequentialModel(ckpt), windows)
    return stats, ckpt.attention_sha256(("q", "k"))


def _statistics_ranking(ckpt: Checkpoint, options: MethodOptions, method: str) -> Ranking:
    stats, sha = calibration_statistics(ckpt, options)
    extra = per_layer_fields(stats)
    if method == "block-influence":
        scores, action = [1.0 - c for c in stats.block_cosine], LayerAction.DROP_BLOCK
    else:
        scores, action = [1.0 - c for c in stats.attention_cosine], LayerAction.DROP_ATTENTION
    scored = LayerScores(method, scores, sha, "attention-tensors", 0.0)
    return Ranking(scored, [action] * len(scores), extra=extra)


@register_method(
    "attention-cosine",
    label="attention-cosine (data)",
    summary="LLM-Drop attention drop",
    actions={LayerAction.DROP_ATTENTION},
    data=True,
)
def attention_cosine(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
    """Importance 1 - mean cos(X_l, X_l + Attn_l(norm X_l)); the least important attention is dropped."""
    return _statistics_ranking(ckpt, options, "attention-cosine")


@register_method(
    "block-influence",
    label="block-influence (data)",
    summary="ShortGPT block removal",
    actions={LayerAction.DROP_BLOCK},
    data=True,
)
def block_influence(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
    """ShortGPT's block influence 1 - mean cos(block input, block output); the least influential blocks go."""
    return _statistics_ranking(ckpt, options, "block-influence")


@register_method(
    "harp",
    label="HARP, calibrated alpha (data)",
    summary="HARP: linearize top layers, calibrated alpha",
    actions={LayerAction.LINEARIZE},
    data=True,
)
def harp(ckpt: Checkpoint, options: MethodOptions, needed: int | None) -> Ranking:
    """HARP: linearize the highest layers; alphas by the top-down calibration-perplexity search, for the
    `needed` highest layers (all but layer 0 if None)."""
    n = ckpt.shape.n_layers
    count = n - 1 if needed is None else min(needed, n - 1)
    layers = list(range(n - count, n))
    alphas: dict[int, float] = {}
    extra: dict[str, list[float]] = {}
    if layers:
        runner = SequentialTailRunner(SequentialModel(ckpt), _windows(ckpt, options), keep_from=layers[0])
        try:
            alphas = calibrate_alphas(runner, layers, log=options.log)
            extra["calib_nll_unpruned"] = [runner.nll(layers[0])]
        finally:
            runner.close()
    extra["alpha"] = [alphas.get(i, np.nan) for i in range(n)]
    return Ranking(_scores(ckpt, "harp", depth_scores(n)), [LayerAction.LINEARIZE] * n, alphas, extra)
