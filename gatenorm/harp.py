"""HARP's linearized attention (arXiv 2507.01900): with Q and K gone, each token attends to itself only.

The sublayer is then ``h + alpha * o_proj(repeat_kv(v_proj(norm(h))))``, and since both projections are
linear it folds into one ``d x d`` matmul (no larger than ``o_proj`` alone) and keeps no KV cache.
"""

from __future__ import annotations

import torch


def fuse_value_output(
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    n_head: int,
    n_head_kv: int,
    alpha: float,
    b_v: torch.Tensor | None = None,
    b_o: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``alpha * W_o @ repeat_kv(W_v)`` (``d x d``) and its bias ``alpha * (W_o @ repeat_kv(b_v) + b_o)``.

    Shapes are HF's (``out x in``): w_v (n_head_kv*head_dim, d), w_o (d, n_head*head_dim). Query head h
    reads KV head h // n_rep, so the output columns of each GQA group are summed instead of repeating
    W_v. Computed in float64, returned in w_o's dtype; the bias is None when neither bias exists.
    """
    d, n_rep = w_o.shape[0], n_head // n_head_kv
    head_dim = w_o.shape[1] // n_head
    grouped_o = w_o.double().view(d, n_head_kv, n_rep, head_dim).sum(dim=2).reshape(d, n_head_kv * head_dim)
    weight = alpha * (grouped_o @ w_v.double())
    bias = None
    if b_v is not None or b_o is not None:
        bias = torch.zeros(d, dtype=torch.float64)
        if b_v is not None:
            bias += grouped_o @ b_v.double()
        if b_o is not None:
            bias += b_o.double()
        bias = (alpha * bias).to(w_o.dtype)
    return weight.to(w_o.dtype), bias
