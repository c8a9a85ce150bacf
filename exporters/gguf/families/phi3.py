"""Phi-3 / Phi-3.5 / Phi-4-mini: LongRoPE as llama.cpp's factor tensors; in a deci file the fused
``attn_qkv`` and ``ffn_up`` split into q / k / v and gate / up, q/k rows put in NORM rope order."""

from __future__ import annotations

import math

import numpy as np

from exporters.gguf.families.base import MT, GgufFamily, register_gguf_family
from gatenorm.architectures import gguf_tensor

ROPE_LONG, ROPE_SHORT = gguf_tensor(MT.ROPE_FACTORS_LONG), gguf_tensor(MT.ROPE_FACTORS_SHORT)


def _short(tensor) -> str:
    """gguf-py's per-layer name of `tensor` without ``blk.{bid}.`` (``attn_qkv``)."""
    return gguf_tensor(tensor, "").split(".")[-1]


@register_gguf_family("phi3")
class Phi3Gguf(GgufFamily):
    """Phi-3: ``attn_qkv`` is the attention sublayer's one projection; ``ffn_up`` holds gate and up."""

    attention_sublayer = (MT.ATTN_NORM, MT.ATTN_QKV, MT.ATTN_OUT)
    rope_types = ("longrope",)

    def extra_tensors(self, config: dict, head_dim: int) -> dict[str, np.ndarray]:
        """LongRoPE's per-frequency factors (llama.cpp picks long ones when the context exceeds
        ``rope.scaling.original_context_length``)."""
        scaling = config.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
            return {}
        return {
            ROPE_LONG: np.asarray(scaling["long_factor"], dtype=np.float32),
            ROPE_SHORT: np.asarray(scaling["short_factor"], dtype=np.float32),
        }

    def rope_attention_factor(self, config: dict) -> float:
        """The factor LongRoPE scales cos / sin by (transformers' and llama.cpp's ``attn_factor``)."""
        scaling = config.get("rope_scaling") or {}
        if scaling.get("attention_factor") is not None:
            return float(scaling["attention_factor"])
        original = int(config.get("original_max_position_embeddings") or config["max_position_embeddings"])
        factor = config["max_position_embeddings"] / original
        return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0

    def deci_unsupported(self, ckpt) -> str:
        config = getattr(ckpt, "config", None)
        if config is not None and float(config.get("partial_rotary_factor", 1.0)) != 1.0:
            return (
                "its rope covers part of each head (partial_rotary_factor, Phi-4-mini) and deci rotates "
                "whole heads (n_rot must equal the head size)"
            )
        fields = getattr(getattr(ckpt, "reader", None), "fields", {})
        rot = fields.get("phi3.rope.dimension_count")
        if rot is not None and int(rot.contents()) != ckpt.shape.head_dim:
            return "its rope covers part of each head and deci rotates whole heads (n_rot = head size)"
        return ""

    def deci_split(self, name: str, shape, ffn: int) -> list[tuple[str, slice, str | None]] | None:
        """deci has separate q / k / v and gate / up: the rows of Phi-3's ``attn_qkv`` and ``ffn_up``
        (gate first, as llama.cpp's SwiGLU reads the fused tensor) as (new name, rows, rotary part), q/k
        marked for the NEOX -> NORM row order."""
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk":
            return None
        i, tensor, kind = parts[1], parts[2], parts[3]
        if tensor == _short(MT.ATTN_QKV):
            split = (("q", MT.ATTN_Q), ("k", MT.ATTN_K), ("v", MT.ATTN_V))
            return [
                (
                    gguf_tensor(t, kind).format(i=i),
                    self.arch.fused_rows(p, shape.n_head, shape.n_head_kv, shape.head_dim),
                    None if p == "v" else p,
                )
                for p, t in split
            ]
        if tensor == _short(MT.FFN_UP):
            return [
                (gguf_tensor(MT.FFN_GATE, kind).format(i=i), slice(0, ffn), None),
                (gguf_tensor(MT.FFN_UP, kind).format(i=i), slice(ffn, 2 * ffn), None),
            ]
        return None

    def deci_metadata_defaults(self, header) -> dict[str, str]:
        """llama.cpp's phi3 always reads rope factor tensors; deci only with ``rope.scaling.type``
        longrope (llama.cpp's converter does not write it for phi3)."""
        if any(t.name == ROPE_LONG for t in header.tensors):
            return {"rope.scaling.type": "longrope"}
        return {}
