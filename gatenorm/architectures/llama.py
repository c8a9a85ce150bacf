"""Llama 1/2/3 (SmolLM, SmolLM2) and Mistral: the base layout, q/k rows interleaved in GGUF (NORM rope)."""

from __future__ import annotations

from gatenorm.architectures.base import Architecture, register


@register("LlamaForCausalLM")
class Llama(Architecture):
    """Llama 1/2/3, SmolLM, and Mistral checkpoints converted as ``llama``."""

    name = "llama"
    gguf_arch = "llama"
    gguf_qk_permuted = True


@register("MistralForCausalLM")
class Mistral(Llama):
    """Mistral: llama layout (llama.cpp converts it as ``llama``, with the q/k permutation)."""

    name = "mistral"

    @classmethod
    def sliding_window(cls, attention, config) -> int | None:
        return getattr(config, "sliding_window", None)  # every Mistral layer uses the config's window
