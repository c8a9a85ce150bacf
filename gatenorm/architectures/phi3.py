"""Phi-3 / Phi-3.5 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (GGUF ``attn_qkv``, a 2x wide
``ffn_up``), NEOX rope (HF row order in GGUF)."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from torch import nn

from gatenorm.architectures.base import MT, Architecture, gguf_tensor, register

ROPE_LONG, ROPE_SHORT = gguf_tensor(MT.ROPE_FACTORS_LONG), gguf_tensor(MT.ROPE_FACTORS_SHORT)


def _short(tensor) -> str:
    """gguf-py's per-layer name of `tensor` without ``blk.{bid}.`` (``attn_qkv``)."""
    return gguf_tensor(tensor, "").split(".")[-1]


def _qkv_rows(part: str, n_head: int, n_head_kv: int, head_dim: int) -> slice | None:
    q, kv = n_head * head_dim, n_head_kv * head_dim
    return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}.get(part)


@register("Phi3ForCausalLM")
class Phi3(Architecture):
    """Phi-3: q, k, v are row blocks of one ``qkv_proj`` (GGUF ``attn_qkv``)."""

    name = "phi3"
    gguf_arch = "phi3"
    hf_tensors: ClassVar[dict[str, str | None]] = {
        **Architecture.hf_tensors,
        **{part: "model.layers.{i}.self_attn.qkv_proj.weight" for part in "qkv"},
    }
    gguf_tensors: ClassVar[dict[str, str | None]] = {
        **Architecture.gguf_tensors,
        **{part: gguf_tensor(MT.ATTN_QKV) for part in "qkv"},
    }
    gguf_attention_sublayer = (MT.ATTN_NORM, MT.ATTN_QKV, MT.ATTN_OUT)
    gguf_rope_types = ("longrope",)
    gguf_ffn_up_factor = 2

    @classmethod
    def fused_rows(cls, part: str, n_head: int, n_head_kv: int, head_dim: int) -> slice | None:
        return _qkv_rows(part, n_head, n_head_kv, head_dim)

    @classmethod
    def value_output(cls, attention: nn.Module):
        c = attention.config
        rows = _qkv_rows("v", c.num_attention_heads, c.num_key_value_heads, attention.head_dim)
        qkv, o = attention.qkv_proj, attention.o_proj
        bias = None if qkv.bias is None else qkv.bias[rows]
        return qkv.weight[rows], bias, o.weight, o.bias

    @classmethod
    def qkv_projection(cls, attention: nn.Module) -> nn.Module:
        return attention.qkv_proj  # rows q, k, v already

    @classmethod
    def gguf_extra_tensors(cls, config: dict, head_dim: int) -> dict[str, np.ndarray]:
        """LongRoPE's per-frequency factors (llama.cpp picks long ones when the context exceeds
        ``rope.scaling.original_context_length``)."""
        scaling = config.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
            return {}
        return {
            ROPE_LONG: np.asarray(scaling["long_factor"], dtype=np.float32),
            ROPE_SHORT: np.asarray(scaling["short_factor"], dtype=np.float32),
        }

    @classmethod
    def longrope_attention_factor(cls, config: dict) -> float:
        """The factor LongRoPE scales cos / sin by (transformers' and llama.cpp's ``attn_factor``)."""
        scaling = config.get("rope_scaling") or {}
        if scaling.get("attention_factor") is not None:
            return float(scaling["attention_factor"])
        original = int(config.get("original_max_position_embeddings") or config["max_position_embeddings"])
        factor = config["max_position_embeddings"] / original
        return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0

    @classmethod
    def deci_unsupported(cls, ckpt) -> str:
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

    @classmethod
    def deci_split(cls, name: str, shape, ffn: int) -> list[tuple[str, slice, str | None]] | None:
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
                    _qkv_rows(p, shape.n_head, shape.n_head_kv, shape.head_dim),
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

    @classmethod
    def deci_metadata_defaults(cls, header) -> dict[str, str]:
        """llama.cpp's phi3 always reads rope factor tensors; deci only with ``rope.scaling.type``
        longrope (llama.cpp's converter does not write it for phi3)."""
        if any(t.name == ROPE_LONG for t in header.tensors):
            return {"rope.scaling.type": "longrope"}
        return {}
