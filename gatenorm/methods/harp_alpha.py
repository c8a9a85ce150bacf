"""HARP's rescaling alpha of a linearized attention sublayer: calibrated (HARP's search) or data-free.

**Calibrated** (HARP, arXiv 2507.01900): top-down, one layer at a time, the alpha that minimizes the
calibration perplexity with the layers above already linearized at their alphas (a grid, then a
golden-section refinement around its best point).

**Data-free** (gatenorm's "self + shared" rule, from the weights only). The linearized output alpha * M x^_i
(M = W_o repeat_kv(W_v) G, G the input norm's gain, x^ the normalized token) is the least-squares fit of the
attention output M sum_j a_ij x^_j when alpha = E<M x^_i, M sum_j a_ij x^_j> / E||M x^_i||^2. Split each token
into a part shared by all tokens and an independent rest: alpha = a_self + (1 - a_self) * rho, where

- a_self is the expected weight a token gives itself. Per head, RoPE cancels in the self logit, so under
  an isotropic input (E[z z^T] = I) it has mean m = tr(G W_q^T W_k G) / sqrt(d_h), while a logit to another
  token has mean 0 and variance s^2 = ||G W_q^T W_k G||_F^2 / d_h; with i earlier tokens
  a_ii ~ 1 / (1 + i exp(s^2/2 - m)) (log-normal sum of the others), averaged over positions 0..ctx-1, and the
  heads are weighted by their share <M_h, M>_F / ||M||_F^2 of the value-output map;
- rho = ||M mean_t x^_t||^2 / mean_t ||M x^_t||^2 is the energy of the shared part, with the residual
  stream's directions modelled by the token embeddings (a sample of rows of the embedding table, RMS-
  normalized and scaled by G): a zeroth-order, weights-only stand-in for the anisotropy of real activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from gatenorm.readers import AttentionWeights

GOLDEN = (math.sqrt(5) - 1) / 2


def head_self_weights(w: AttentionWeights, gain: torch.Tensor, ctx: int) -> np.ndarray:
    """Expected self-attention weight of each query head, mean over positions 0..ctx-1 (see module doc)."""
    d = w.q.shape[1]
    g = gain.double()
    q = (w.q.double() * g).view(w.n_head, w.head_dim, d)
    k = (w.k.double() * g).view(w.n_head_kv, w.head_dim, d)
    k = k.repeat_interleave(w.n_rep, dim=0)
    # tr(G Wq^T Wk G) = <q_h, k_h>_F; ||G Wq^T Wk G||_F^2 = <q q^T, k k^T>_F (dh x dh Grams)
    self_mean = (q * k).sum(dim=(1, 2)) / math.sqrt(w.head_dim)
    cross_var = (q @ q.transpose(1, 2) * (k @ k.transpose(1, 2))).sum(dim=(1, 2)) / w.head_dim
    log_rate = (cross_var / 2 - self_mean).numpy()  # log of the weight of one other token relative to self
    i = np.arange(ctx, dtype=np.float64)[None, :]
    with np.errstate(over="ignore"):
        weights = 1.0 / (1.0 + i * np.exp(np.minimum(log_rate[:, None], 700.0)))
    return weights.mean(axis=1)


def head_value_shares(w: AttentionWeights, gain: torch.Tensor) -> np.ndarray:
    """<M_h, M>_F / ||M||_F^2 per query head, M_h = W_o,h W_v,g(h) G the head's value-output map."""
    d = w.o.shape[0]
    v = (w.v.double() * gain.double()).view(w.n_head_kv, w.head_dim, d)
    o = w.o.double().view(d, w.n_head, w.head_dim).permute(1, 0, 2)  # (n_head, d, dh)
    heads = torch.bmm(o, v.repeat_interleave(w.n_rep, dim=0))  # (n_head, d, d)
    total = heads.sum(dim=0)
    return ((heads * total).sum(dim=(1, 2)) / (total * total).sum().clamp_min(1e-300)).numpy()


def shared_energy(fused: torch.Tensor, gain: torch.Tensor, tokens: torch.Tensor) -> float:
    """rho = ||M mean x^||^2 / mean ||M x^||^2 over `tokens` (rows; RMS-normalized here, then scaled by
    `gain`); `fused` is M without the gain (W_o repeat_kv(W_v), d x d)."""
    x = tokens.float()
    x = x / x.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-30) * gain.float()
    y = (x @ fused.float().T).double()
    return float(y.mean(dim=0).pow(2).sum() / y.pow(2).sum(dim=1).mean().clamp_min(1e-300))


def data_free_alpha(self_weight: float, shared: float) -> float:
    """alpha = a_self + (1 - a_self) * rho (see module doc)."""
    return self_weight + (1.0 - self_weight) * shared


def golden_section(
    f: Callable[[float], float], grid: Sequence[float], refine: int = 5
) -> tuple[float, dict[float, float]]:
    """Minimize `f`: the best point of `grid`, refined by golden section inside its neighbours' bracket.

    Returns the argmin and every evaluated point."""
    seen: dict[float, float] = {}

    def value(x: float) -> float:
        if x not in seen:
            seen[x] = f(x)
        return seen[x]

    points = sorted(grid)
    best = min(range(len(points)), key=lambda i: value(points[i]))
    lo, hi = points[max(best - 1, 0)], points[min(best + 1, len(points) - 1)]
    a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    for _ in range(refine):
        if value(a) < value(b):
            hi, b = b, a
            a = hi - GOLDEN * (hi - lo)
        else:
            lo, a = a, b
            b = lo + GOLDEN * (hi - lo)
    x = min(seen, key=seen.get)
    return x, seen


def calibrate_alphas(
    runner,
    layers: Sequence[int],
    grid: Sequence[float] = (0.0, 0.3, 0.6, 0.9, 1.2, 1.5),
    refine: int = 5,
    log: Callable[[str], None] = lambda _: None,
) -> dict[int, float]:
    """HARP's top-down search: alpha of each of `layers` (highest first) minimizing calibration NLL.

    `runner` is a `TailRunner` holding the unpruned model's inputs of these layers. Its layers are swapped
    for linearized ones while searching and put back before returning.
    """
    arch = runner.arch
    decoder = runner.layers
    originals = {}
    alphas: dict[int, float] = {}
    try:
        for layer in sorted(layers, reverse=True):
            originals[layer] = decoder[layer]
            linear = arch.linearized(decoder[layer], 1.0)  # its `scale` multiplies the update: alpha
            decoder[layer] = linear

            def nll(alpha: float, linear=linear, layer: int = layer) -> float:
                linear.scale = alpha
                return runner.nll(layer)

            alphas[layer], seen = golden_section(nll, grid, refine)
            linear.scale = alphas[layer]
            log(f"harp: layer {layer} alpha {alphas[layer]:.3f} (calib NLL {seen[alphas[layer]]:.4f})")
    finally:
        for layer, original in originals.items():
            decoder[layer] = original
    return alphas
