"""A cost model of a plan: multiply-adds per token of each layer action, and the estimated speedup.

FLOPs per token of prompt processing at context `ctx` (a token at position p attends to p + 1 keys, so a
layer's attention costs its projections plus 4 * n_head * head_dim * (ctx + 1) / 2 on average):
keep = projections + attention + MLP, linearize = one d x d matmul + MLP, drop-attention = MLP,
drop-block = 0, plus the LM head. It counts compute, not bytes; docs/study.md compares it with llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction
from gatenorm.readers import Checkpoint, ModelShape


@dataclass(frozen=True)
class CostModel:
    """FLOPs per token of each action for one model shape, MLP width and vocabulary, at context `ctx`."""

    shape: ModelShape
    ffn: int
    vocab: int
    ctx: int = 512

    @property
    def mlp(self) -> float:
        return 2.0 * 3 * self.shape.d_model * self.ffn

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
        """FLOPs per token of the model with `actions` per layer (LM head included)."""
        return sum(self.layer(a) for a in actions) + 2.0 * self.shape.d_model * self.vocab

    def speedup(self, actions: Sequence[LayerAction]) -> float:
        """Estimated speedup of `actions` over the unpruned model."""
        return self.flops([LayerAction.KEEP] * len(actions)) / self.flops(actions)


def cost_model(ckpt: Checkpoint, ctx: int = 512) -> CostModel:
    """The cost model of `ckpt`, its MLP width and vocabulary read from the metadata."""
    if ctx < 1:
        raise GatenormError(f"--ctx {ctx}: the cost model needs a context of at least 1 token")
    config = getattr(ckpt, "config", None)
    if config is not None:  # HF folder
        ffn, vocab = config.get("intermediate_size"), config.get("vocab_size")
    else:  # GGUF: the tensor table has the shapes
        tensors = getattr(ckpt, "tensors", {})
        up, embd = tensors.get("blk.0.ffn_up.weight"), tensors.get("token_embd.weight")
        ffn = None if up is None else int(max(up.shape))
        vocab = None if embd is None else int(max(embd.shape))
    if not ffn or not vocab:
        raise GatenormError(f"{ckpt.path}: cannot read the MLP width and vocabulary for the cost model")
    return CostModel(ckpt.shape, int(ffn), int(vocab), ctx)
