"""Qwen3 (dense): per-head q/k RMSNorm before rotary, explicit head_dim, NEOX rope."""

from __future__ import annotations

from gatenorm.architectures.base import Architecture, register


@register("Qwen3ForCausalLM")
class Qwen3(Architecture):
    """Qwen3: per-head q/k RMSNorm, explicit head_dim, NEOX rope (HF row order in GGUF)."""

    name = "qwen3"
    gguf_arch = "qwen3"
    hf_qk_norms = ("q_norm", "k_norm")
    deci_exportable = False
    deci_refusal = "qwen3 has per-head q/k norms, which llama.cpp's deci graph cannot run"
    gguf_block_removal = True
    gguf_works = (
        "drop-block plans (--method block-influence) as a qwen3 GGUF, or PyTorch / ONNX for every action"
    )
