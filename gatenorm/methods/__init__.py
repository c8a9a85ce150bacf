"""Every pruning method behind one API: a method ranks the layers and proposes an action (and alpha) per
layer; `make_method_plan` turns that into a `Plan` for a budget in layers or in estimated speedup.

| method | data | action | ranked by |
| --- | --- | --- | --- |
| gate-norm, gate-norm-head | no | drop-attention | ||W_q W_k^T||_F (whole layer / per head) |
| random, last | no | drop-attention | a seeded draw / depth |
| attention-cosine | calibration | drop-attention | 1 - mean cos(X, X + Attn(norm X)) (LLM-Drop) |
| block-influence | calibration | drop-block | 1 - mean cos(block input, block output) (ShortGPT) |
| harp | calibration | linearize | depth; alpha by HARP's top-down perplexity search |
| harp-free | no | linearize | depth; alpha by gatenorm's data-free self-weight rule |
| mixed | no | per layer | Gate-Norm; linearize (data-free alpha) or drop-attention |
| mixed-synthetic | no (own text) | per layer | least drop / linearize / drop-block damage per saved FLOP |
"""

from gatenorm.methods.registry import (
    METHODS,
    Method,
    make_method_plan,
    method_names,
    method_spec,
    rank_layers,
    score_checkpoint,
)
from gatenorm.methods.spec import MethodOptions, MethodSettings, MethodSpec, Ranking, register_method

__all__ = [
    "METHODS",
    "Method",
    "MethodOptions",
    "MethodSettings",
    "MethodSpec",
    "Ranking",
    "make_method_plan",
    "method_names",
    "method_spec",
    "rank_layers",
    "register_method",
    "score_checkpoint",
]
