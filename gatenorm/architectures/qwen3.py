"""Qwen3 (dense): per-head q/k RMSNorm before rotary, explicit head_dim, NEOX rope.

GGUF (as ``qwen3``, or ``qwen35`` hosting drop-attention): `exporters.gguf.families.qwen3`.
"""

from __future__ import annotations

from gatenorm.architectures.base import Architecture, register


@register("Qwen3ForCausalLM")
class Qwen3(Architecture):
    """Qwen3: per-head q/k RMSNorm, explicit head_dim, NEOX rope (HF row order in GGUF)."""

    name = "qwen3"
    gguf_arch = "qwen3"
    hf_qk_norms = ("q_norm", "k_norm")
