"""Llama 1/2/3 (SmolLM, SmolLM2) and Mistral: the base layout, q/k rows interleaved in GGUF (NORM rope)."""

from __future__ import annotations

import math

import numpy as np

from gatenorm.architectures.base import MT, Architecture, gguf_tensor, register

ROPE_FREQS = gguf_tensor(MT.ROPE_FREQS)


def llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:
    """Llama-3.x's rope scaling as llama.cpp's ``rope_freqs`` tensor: the factor each rotary frequency is
    divided by (1 for wavelengths under ``original / high_freq_factor``, ``factor`` above ``original /
    low_freq_factor``, interpolated between), float32 (head_dim / 2,)."""
    scaling = config["rope_scaling"]
    base = float(config.get("rope_theta", 10000.0))
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = base ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, between))
    return factors.astype(np.float32)


@register("LlamaForCausalLM")
class Llama(Architecture):
    """Llama 1/2/3, SmolLM, and Mistral checkpoints converted as ``llama``."""

    name = "llama"
    gguf_arch = "llama"
    gguf_qk_permuted = True
    gguf_rope_types = ("llama3",)

    @classmethod
    def gguf_extra_tensors(cls, config: dict, head_dim: int) -> dict[str, np.ndarray]:
        scaling = config.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type")) == "llama3":
            return {ROPE_FREQS: llama3_rope_factors(config, head_dim)}
        return {}


@register("MistralForCausalLM")
class Mistral(Llama):
    """Mistral: llama layout (llama.cpp converts it as ``llama``, with the q/k permutation)."""

    name = "mistral"

    @classmethod
    def sliding_window(cls, attention, config) -> int | None:
        return getattr(config, "sliding_window", None)  # every Mistral layer uses the config's window
