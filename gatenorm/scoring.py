"""Per-layer attention importance scores that need no data: Gate-Norm (arXiv 2512.20636) and baselines.

Lower score = less important = dropped first.
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from gatenorm.errors import GatenormError
from gatenorm.readers import AttentionWeights, Checkpoint, ContentHash


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


@dataclass
class LayerScores:
    """One method's score per layer of one checkpoint, with what is needed to reproduce it."""

    method: str  # the method's name (a `gatenorm.methods.Method` member is normalized to its value)
    scores: list[float]
    content_sha256: str
    hashed: str  # "attention-tensors" (raw bytes of the q/k read) or "shape" (nothing was read)
    seconds: float
    seed: int | None = None

    def __post_init__(self) -> None:
        self.method = str(getattr(self.method, "value", self.method))

    def ranks(self) -> list[int]:
        """Rank of each layer, 1 = lowest score (dropped first); ties go to the deeper layer first."""
        order = sorted(range(len(self.scores)), key=lambda i: (self.scores[i], -i))
        ranks = [0] * len(order)
        for rank, layer in enumerate(order, start=1):
            ranks[layer] = rank
        return ranks


def weight_scores(ckpt: Checkpoint, method: str, scorer: Callable[[AttentionWeights], float]) -> LayerScores:
    """`scorer` of every layer's q/k weights, read one layer at a time; hashed over the q/k bytes read."""
    start = time.perf_counter()
    digest = ContentHash()
    scores = []
    with torch.inference_mode():
        # Scores are invariant to the same row permutation inside every q and k head, so GGUF rows
        # need not be put back in HF order (tests/test_scoring.py checks the invariance).
        for weights in ckpt.iter_attention(("q", "k"), digest, hf_rows=False):
            # a layer already without attention (deci) is not scored; plans never pick it
            scores.append(0.0 if weights.q is None else scorer(weights))
            del weights  # let the reader's prefetch buffer be the only other layer alive
    return LayerScores(method, scores, digest.hexdigest(), "attention-tensors", time.perf_counter() - start)


def depth_scores(n: int) -> list[float]:
    """Scores that rank the deepest of `n` layers lowest (changed first)."""
    return [float(n - 1 - i) for i in range(n)]


def shape_scores(
    ckpt: Checkpoint, method: str, scores: Iterable[float], seed: int | None = None
) -> LayerScores:
    """Scores that read no tensor (a seeded draw, depth): hashed over the model's shape only."""
    values = list(scores)
    if len(values) != ckpt.shape.n_layers:
        raise GatenormError(f"{method}: {len(values)} scores for {ckpt.shape.n_layers} layers")
    return LayerScores(method, values, ContentHash.of_shape(ckpt.shape).hexdigest(), "shape", 0.0, seed)


def seeded_scores(n: int, seed: int) -> list[float]:
    """A seeded uniform draw per layer (the random baseline)."""
    rng = _random.Random(seed)
    return [rng.random() for _ in range(n)]
