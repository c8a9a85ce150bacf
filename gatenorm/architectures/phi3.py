"""Phi-3 / Phi-3.5 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (GGUF ``attn_qkv``, a 2x wide
``ffn_up``), NEOX rope (HF row order in GGUF)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from gatenorm.architectures.base import MT, Architecture, gguf_tensor, register


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
