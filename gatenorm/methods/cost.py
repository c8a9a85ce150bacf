"""A cost model of a plan: multiply-adds per token of each layer action, and the estimated speedup.

FLOPs per token of prompt processing at context `ctx` (a token at position p attends to p + 1 keys, so a
layer's attention costs its projections plus 4 * n_head * head_dim * (ctx + 1) / 2 on average):
keep = projections + attention + MLP, linearize = one d x d matmul + MLP, drop-attention = MLP,
drop-block = 0. The LM head is left out: in prompt processing it runs for the last token only. It counts
compute, not bytes; docs/study.md compares it with llama.cpp's measured speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction
from gatenorm.readers import Checkpoint, ModelShape


@dataclass(frozen=True)
class CostModel:
    """FLOPs per token of each action for one model shape and MLP width, at context `ctx`."""

    shape: ModelShape
    ffn: int
    ctx: int = 512
    #: FLOPs per token of one MLP (the architecture's `mlp_flops`); None: a gated MLP, 2 * 3 * d * ffn
    mlp_flops: float | None = None

    @property
    def mlp(self) -> float:
        return 2.0 * 3 * self.shape.d_model * self.ffn if self.mlp_flops is None else self.mlp_flops

    @property
    def attention(self) -> float:
        s = self.shape
        q_width, kv_width = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        projections = 2.0 * s.d_model * (2 * q_width + 2 * kv_width)
        return projections + 4.0 * q_width * (self.ctx + 1) / 2

    def layer(self, action: LayerAction) -> float:
        """FLOPs per token of one layer given `action`."""
        if action is LayerAction.KEEP:
            return self.attention + self.mlp
        if action is LayerAction.LINEARIZE:
            return 2.0 * self.shape.d_model**2 + self.mlp
        if action is LayerAction.DROP_ATTENTION:
            return self.mlp
        return 0.0

    def flops(self, actions: Sequence[LayerAction]) -> float:
        """FLOPs per prompt token of the layers with `actions` per layer."""
        return sum(self.layer(a) for a in actions)

    def speedup(self, actions: Sequence[LayerAction]) -> float:
        """Estimated speedup of `actions` over the unpruned model."""
        return self.flops([LayerAction.KEEP] * len(actions)) / self.flops(actions)


def cost_model(ckpt: Checkpoint, ctx: int = 512) -> CostModel:
    """The cost model of `ckpt`, its MLP width and FLOPs from the architecture adapter."""
    if ctx < 1:
        raise GatenormError(f"--ctx {ctx}: the cost model needs a context of at least 1 token")
    ffn = ckpt.arch.mlp_width(ckpt)
    if not ffn:
        raise GatenormError(f"{ckpt.path}: cannot read the MLP width for the cost model")
    return CostModel(ckpt.shape, int(ffn), ctx, ckpt.arch.mlp_flops(ckpt.shape.d_model, int(ffn)))
