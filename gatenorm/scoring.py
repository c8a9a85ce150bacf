"""Per-layer attention importance scores that need no data: Gate-Norm (arXiv 2512.20636) and baselines.

Lower score = less important = dropped first.
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from gatenorm.errors import GatenormError
from gatenorm.readers import AttentionWeights, Checkpoint, ContentHash


class Method(str, Enum):
    """Scoring methods known to `score_checkpoint`."""

    GATE_NORM = "gate-norm"
    GATE_NORM_HEAD = "gate-norm-head"
    RANDOM = "random"
    LAST = "last"
    # Methods that need calibration text or more than q/k: ranked by `gatenorm.methods`.
    ATTENTION_COSINE = "attention-cosine"
    BLOCK_INFLUENCE = "block-influence"
    HARP = "harp"
    HARP_FREE = "harp-free"
    MIXED = "mixed"
    MIXED_SYNTHETIC = "mixed-synthetic"


def grouped_queries(w: AttentionWeights) -> torch.Tensor:
    """Sum of the query heads of each GQA group: (n_head_kv*head_dim, d).

    With K_r = repeat_kv(K), Q^T K_r = sum_h Q_h^T K_g(h) = sum_g (sum_{h in g} Q_h)^T K_g, so the
    whole-layer coupling only needs the group sums.
    """
    if w.n_rep == 1:
        return w.q
    d = w.q.shape[1]
    return w.q.view(w.n_head_kv, w.n_rep, w.head_dim, d).sum(dim=1).reshape(w.n_head_kv * w.head_dim, d)


def _frobenius_inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b>_F accumulated in float64."""
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


def gram_inner(a: torch.Tensor, b: torch.Tensor, blocks: int = 4) -> float:
    """<a a^T, b b^T>_F for a, b of shape (r, d), computing only the upper block triangle of each Gram.

    Block row i gives a_i [a_i, ..., a_last]^T: the diagonal block counts once, the others twice (both Grams
    are symmetric), which saves (blocks - 1) / (2 * blocks) of the flops of two full Gram matrices.
    """
    r = a.shape[0]
    step = -(-r // blocks)
    total = 0.0
    for start in range(0, r, step):
        end = min(start + step, r)
        ga, gb = a[start:end] @ a[start:].T, b[start:end] @ b[start:].T
        total += _frobenius_inner(ga[:, : end - start], gb[:, : end - start])
        total += 2.0 * _frobenius_inner(ga[:, end - start :], gb[:, end - start :])
    return total


def gate_norm(w: AttentionWeights) -> float:
    """m_l = ||W_q W_k^T||_F = ||q_proj.weight^T @ repeat_kv(k_proj.weight)||_F, exactly.

    With P the group-summed queries and K the keys (both r x d, r = n_head_kv*head_dim), m^2 = ||P^T K||_F^2,
    computed as <P P^T, K K^T>_F from the upper block triangles of two r x r Gram matrices (about 1.25 r^2 d
    multiply-adds) when that is cheaper than the d x d product P^T K (r d^2), else from that product.
    """
    p, k = grouped_queries(w), w.k
    r, d = k.shape
    if 1.25 * r < d:
        return math.sqrt(max(gram_inner(p, k), 0.0))
    row_norms = torch.linalg.vector_norm(p.T @ k, dim=1)  # d float32 values; no float64 copy of d x d
    return float(torch.linalg.vector_norm(row_norms.double()))


def gate_norm_head(w: AttentionWeights) -> float:
    """Per-head variant sqrt(sum_h ||W_q,h W_k,g(h)^T||_F^2), from per-head dh x dh Gram matrices."""
    d = w.q.shape[1]
    q = w.q.view(w.n_head, w.head_dim, d)
    k = w.k.view(w.n_head_kv, w.head_dim, d)
    gram_q = torch.bmm(q, q.transpose(1, 2)).view(w.n_head_kv, w.n_rep, w.head_dim, w.head_dim).sum(dim=1)
    gram_k = torch.bmm(k, k.transpose(1, 2))
    return math.sqrt(max(_frobenius_inner(gram_q, gram_k), 0.0))


#: Scores computed from each layer's q/k weights.
WEIGHT_SCORERS: dict[Method, Callable[[AttentionWeights], float]] = {
    Method.GATE_NORM: gate_norm,
    Method.GATE_NORM_HEAD: gate_norm_head,
}


@dataclass
class LayerScores:
    """One method's score per layer of one checkpoint, with what is needed to reproduce it."""

    method: Method
    scores: list[float]
    content_sha256: str
    hashed: str  # "attention-tensors" (raw bytes of the q/k read) or "shape" (nothing was read)
    seconds: float
    seed: int | None = None

    def ranks(self) -> list[int]:
        """Rank of each layer, 1 = lowest score (dropped first); ties go to the deeper layer first."""
        order = sorted(range(len(self.scores)), key=lambda i: (self.scores[i], -i))
        ranks = [0] * len(order)
        for rank, layer in enumerate(order, start=1):
            ranks[layer] = rank
        return ranks


def score_checkpoint(ckpt: Checkpoint, method: Method | str, seed: int = 0) -> LayerScores:
    """Score every layer of `ckpt` with `method`, reading only the tensors the method needs."""
    method = Method(method)
    start = time.perf_counter()
    scorer = WEIGHT_SCORERS.get(method)
    n = ckpt.shape.n_layers
    if scorer is not None:
        digest = ContentHash()
        scores = []
        with torch.inference_mode():
            # Scores are invariant to the same row permutation inside every q and k head, so GGUF rows
            # need not be put back in HF order (tests/test_scoring.py checks the invariance).
            for weights in ckpt.iter_attention(("q", "k"), digest, hf_rows=False):
                # a layer already without attention (deci) is not scored; plans never pick it
                scores.append(0.0 if weights.q is None else scorer(weights))
                del weights  # let the reader's prefetch buffer be the only other layer alive
        seconds = time.perf_counter() - start
        return LayerScores(method, scores, digest.hexdigest(), "attention-tensors", seconds)
    if method not in (Method.RANDOM, Method.LAST):
        raise GatenormError(f"{method.value} is ranked by gatenorm.methods.rank_layers, not score_checkpoint")
    if method is Method.RANDOM:
        rng = _random.Random(seed)
        scores = [rng.random() for _ in range(n)]
    else:  # Method.LAST: deepest layer has the lowest score
        scores = [float(n - 1 - i) for i in range(n)]
    return LayerScores(
        method,
        scores,
        ContentHash.of_shape(ckpt.shape).hexdigest(),
        "shape",
        time.perf_counter() - start,
        seed if method is Method.RANDOM else None,
    )
