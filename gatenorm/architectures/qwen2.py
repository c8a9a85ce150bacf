"""Qwen2 / Qwen2.5: q/k/v biases, NEOX rope (GGUF keeps HF row order)."""

from __future__ import annotations

from gatenorm.architectures.base import Architecture, register


@register("Qwen2ForCausalLM")
class Qwen2(Architecture):
    """Qwen2 / Qwen2.5: q/k/v biases, NEOX rope (llama.cpp keeps HF row order; deci export permutes it)."""

    name = "qwen2"
    gguf_arch = "qwen2"
