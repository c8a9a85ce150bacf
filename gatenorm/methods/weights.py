"""Per-layer statistics from the weights alone (no data), read lazily one layer at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gatenorm.harp import fuse_value_output
from gatenorm.methods.harp_alpha import data_free_alpha, head_self_weights, head_value_shares, shared_energy
from gatenorm.readers import Checkpoint, ContentHash
from gatenorm.scoring import gate_norm


@dataclass
class WeightStatistics:
    """Per layer: Gate-Norm ||W_q W_k^T||_F, the data-free alpha (`gatenorm.methods.harp_alpha`) and its two
    parts (expected self weight, shared energy), the value-output gain ||M||_F / sqrt(d) of
    M = W_o repeat_kv(W_v) G (G: the input norm's gain), and the content hash of the q/k bytes (the same hash
    Gate-Norm plans record)."""

    gate_norm: list[float]
    alpha: list[float]
    self_weight: list[float]
    shared: list[float]
    value_gain: list[float]
    content_sha256: str
    seconds: float


def embedding_sample(ckpt: Checkpoint, rows: int = 1024) -> torch.Tensor:
    """A fixed pseudo-random sample of `rows` rows of the token embedding table (all rows if fewer)."""
    table = ckpt.read_embedding()
    if table.shape[0] <= rows:
        return table
    pick = torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(0))[:rows]
    return table[pick].clone()


def weight_statistics(ckpt: Checkpoint, ctx: int = 512) -> WeightStatistics:
    """Read q, k, v, o and the input norm of each layer in turn (only one layer's tensors alive) and a sample
    of the embedding table."""
    import time

    start = time.perf_counter()
    digest = ContentHash()
    out = WeightStatistics([], [], [], [], [], "", 0.0)
    with torch.inference_mode():
        tokens = embedding_sample(ckpt)
        for layer in range(ckpt.shape.n_layers):
            w = ckpt.read_attention(layer, ("q", "k"), digest)  # hashed exactly as Gate-Norm hashes
            rest = ckpt.read_attention(layer, ("v", "o"))
            w.v, w.o = rest.v, rest.o
            gain = ckpt.read_norm(layer)
            d = gain.shape[0]
            fused, _ = fuse_value_output(w.v, w.o, w.n_head, w.n_head_kv, 1.0)
            self_weight = float((head_value_shares(w, gain) * head_self_weights(w, gain, ctx)).sum())
            shared = shared_energy(fused, gain, tokens)
            out.gate_norm.append(gate_norm(w))
            out.self_weight.append(self_weight)
            out.shared.append(shared)
            out.alpha.append(data_free_alpha(self_weight, shared))
            out.value_gain.append(
                float(torch.linalg.matrix_norm(fused.double() * gain.double())) / math.sqrt(d)
            )
    out.content_sha256 = digest.hexdigest()
    out.seconds = time.perf_counter() - start
    return out
