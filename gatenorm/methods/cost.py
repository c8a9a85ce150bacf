"""A cost model of a plan: multiply-adds per token of each layer action, and the estimated speedup.

Prefill (the default phase): FLOPs per token of prompt processing at context `ctx` (a token at position p
attends to p + 1 keys, so a layer's attention costs its projections plus 4 * n_head * head_dim * (ctx + 1)
/ 2 on average): keep = projections + attention + MLP, linearize = one d x d matmul + MLP, drop-attention =
MLP, drop-block = 0; a healed layer (`gatenorm.heal`) adds its repair's d x d matmul (a healed
drop-attention costs what linearize does, a healed drop-block that matmul alone). The LM head is left
out: in prompt processing it runs for the last token only. It
counts compute, not bytes; docs/study.md compares it with llama.cpp's measured speed.

Decode (``phase="decode"``): one generated token at depth `ctx` attends to ctx + 1 keys (4 * n_head *
head_dim * (ctx + 1) FLOPs per layer) and is memory-bound as much as compute-bound, so its cost is a
FLOP/byte model: FLOPs + `flops_per_byte` * bytes read, the bytes being the layer's weights (at
`weight_bytes` per parameter, Q8_0 by default) and, for a layer that keeps attention, its K and V cache
(f16) up to the depth. The LM head runs for every generated token, so decode counts it (shared by every
plan, it bounds the speedup). `scripts/bench_longctx.py` checks these estimates against llama.cpp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint, ModelShape

#: What a speedup target is about: processing a prompt of --ctx tokens, or decoding at depth --ctx.
Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")
#: Bytes per weight of llama.cpp's Q8_0 (32 int8 + one f16 scale per block): decode's default weight type.
Q8_0_BYTES = 34 / 32
#: The machine's FLOPs per byte of memory read in decode (CPU, a few threads, llama.cpp's quantized
#: matrix-vector kernels): time = (FLOPs + this * bytes) / peak FLOP/s.
DECODE_FLOPS_PER_BYTE = 4.0
KV_BYTES = 2  # f16 K and V cache entries, llama.cpp's default


@dataclass(frozen=True)
class CostModel:
    """Cost per token of each action for one model shape and MLP width, at context `ctx` (prefill: FLOPs;
    decode: FLOPs + `flops_per_byte` * bytes read, see the module docstring)."""

    shape: ModelShape
    ffn: int
    ctx: int = 512
    #: FLOPs per token of one MLP (the architecture's `mlp_flops`); None: a gated MLP, 2 * 3 * d * ffn
    mlp_flops: float | None = None
    phase: Phase = "prefill"
    vocab: int = 0  # decode: the LM head's rows (0: left out)
    weight_bytes: float = Q8_0_BYTES
    flops_per_byte: float = DECODE_FLOPS_PER_BYTE
    #: bytes per weight of the LM head (None: `weight_bytes`); a quantized file often stores it apart
    head_weight_bytes: float | None = None

    @property
    def mlp(self) -> float:
        return 2.0 * 3 * self.shape.d_model * self.ffn if self.mlp_flops is None else self.mlp_flops

    @property
    def keys(self) -> float:
        """Keys one token attends to: ctx + 1 when decoding at depth ctx, (ctx + 1) / 2 on average in a
        prompt of ctx tokens."""
        return self.ctx + 1.0 if self.phase == "decode" else (self.ctx + 1) / 2

    @property
    def attention(self) -> float:
        s = self.shape
        q_width, kv_width = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        projections = 2.0 * s.d_model * (2 * q_width + 2 * kv_width)
        return projections + 4.0 * q_width * self.keys

    def _bytes(self, action: LayerAction, repaired: bool = False) -> float:
        """Decode: bytes one token reads in a layer with `action` (weights, and the KV cache it keeps)."""
        s = self.shape
        q_width, kv_width = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        mlp = 3.0 * s.d_model * self.ffn
        weights = {
            LayerAction.KEEP: s.d_model * (2 * q_width + 2 * kv_width) + mlp,
            LayerAction.LINEARIZE: s.d_model**2 + mlp,
            LayerAction.DROP_ATTENTION: mlp,
        }.get(action, 0.0)
        if repaired and action is not LayerAction.LINEARIZE:
            weights += s.d_model**2
        kv = 2.0 * kv_width * KV_BYTES * (self.ctx + 1) if action is LayerAction.KEEP else 0.0
        return weights * self.weight_bytes + kv

    def _flops(self, action: LayerAction, repaired: bool = False) -> float:
        if repaired and action is not LayerAction.LINEARIZE:  # the repair's matmul on top
            return 2.0 * self.shape.d_model**2 + self._flops(action)
        if action is LayerAction.KEEP:
            return self.attention + self.mlp
        if action is LayerAction.LINEARIZE:
            return 2.0 * self.shape.d_model**2 + self.mlp
        if action is LayerAction.DROP_ATTENTION:
            return self.mlp
        return 0.0

    def layer(self, action: LayerAction, repaired: bool = False) -> float:
        """Cost per token of one layer given `action`, healed if `repaired` (prefill: FLOPs)."""
        if self.phase == "decode":
            return self._flops(action, repaired) + self.flops_per_byte * self._bytes(action, repaired)
        return self._flops(action, repaired)

    def _head(self) -> tuple[float, float]:
        """Decode: (FLOPs, bytes) of the LM head per token (prefill leaves it out)."""
        if self.phase != "decode":
            return 0.0, 0.0
        n = float(self.vocab * self.shape.d_model)
        per_weight = self.weight_bytes if self.head_weight_bytes is None else self.head_weight_bytes
        return 2.0 * n, n * per_weight

    @property
    def head(self) -> float:
        """Decode: the LM head's cost per token (prefill leaves it out)."""
        flops, nbytes = self._head()
        return flops + self.flops_per_byte * nbytes

    def flops(self, actions: Sequence[LayerAction], repaired: Collection[int] = ()) -> float:
        """Cost per token of the model with `actions` per layer, the layers in `repaired` healed (prefill:
        FLOPs of the layers)."""
        return sum(self.layer(a, i in repaired) for i, a in enumerate(actions)) + self.head

    def compute(self, actions: Sequence[LayerAction], repaired: Collection[int] = ()) -> float:
        """FLOPs alone per token of the model with `actions` (decode: with the LM head), no bytes term."""
        return sum(self._flops(a, i in repaired) for i, a in enumerate(actions)) + self._head()[0]

    def bytes_read(self, actions: Sequence[LayerAction], repaired: Collection[int] = ()) -> float:
        """Decode: bytes one token reads with `actions` (the layers' weights, the KV cache up to the depth,
        the LM head); 0 for prefill, which this model counts in FLOPs only."""
        if self.phase != "decode":
            return 0.0
        return sum(self._bytes(a, i in repaired) for i, a in enumerate(actions)) + self._head()[1]

    def speedup(self, actions: Sequence[LayerAction], repaired: Collection[int] = ()) -> float:
        """Estimated speedup of `actions` (the layers in `repaired` healed) over the unpruned model."""
        return self.flops([LayerAction.KEEP] * len(actions)) / self.flops(actions, repaired)

    def plan_speedup(self, plan: Plan) -> float:
        """Estimated speedup of `plan` (its repairs counted) over the unpruned model."""
        return self.speedup([lp.action for lp in plan.layers], set(plan.repaired))


def cost_model(
    ckpt: Checkpoint, ctx: int = 512, phase: Phase = "prefill", stored_bytes: bool = False
) -> CostModel:
    """The cost model of `ckpt` for `phase` at context `ctx`, its MLP width and FLOPs from the
    architecture adapter; with `stored_bytes`, decode's bytes per weight are the file's own (its layer
    matrices' and its LM head's storage types, `stored_weight_bytes`) instead of Q8_0."""
    if ctx < 1 and phase == "prefill":
        raise GatenormError(f"--ctx {ctx}: the cost model needs a context of at least 1 token")
    if phase not in PHASES:
        raise GatenormError(f"--speedup-for {phase!r}: choose prefill or decode")
    ffn = ckpt.arch.mlp_width(ckpt)
    if not ffn:
        raise GatenormError(f"{ckpt.path}: cannot read the MLP width for the cost model")
    model = CostModel(ckpt.shape, int(ffn), ctx, ckpt.arch.mlp_flops(ckpt.shape.d_model, int(ffn)))
    if phase == "decode":
        model = dataclasses.replace(model, phase="decode", vocab=_vocab(ckpt))
        if stored_bytes:
            layers, head = stored_weight_bytes(ckpt)
            model = dataclasses.replace(model, weight_bytes=layers, head_weight_bytes=head)
    return model


def stored_weight_bytes(ckpt: Checkpoint) -> tuple[float, float]:
    """Bytes per weight of a GGUF's layer matrices (all ``blk.*`` 2-D tensors) and of its LM head
    (``output.weight``, else the tied ``token_embd.weight``), as stored (quantized)."""
    tensors = getattr(ckpt, "tensors", None)
    if not tensors:
        raise GatenormError(f"{ckpt.path}: stored bytes per weight are read from a GGUF's tensors")

    def per_weight(ts: list) -> float:
        return sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)

    layers = [t for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2]
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))
    return per_weight(layers), per_weight([head])


def _vocab(ckpt: Checkpoint) -> int:
    """Rows of the LM head (decode runs it for every token): from the metadata, or 0 when unknown."""
    config = getattr(ckpt, "config", None)
    if config is not None:
        return int(config.get("vocab_size") or 0)
    tensors = getattr(ckpt, "tensors", {})
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))
    return 0 if head is None else int(max(head.shape))
