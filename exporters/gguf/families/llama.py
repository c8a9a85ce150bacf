"""Llama 1/2/3 (and Mistral, SmolLM, SmolLM3, granite, deci through it): Llama-3.x's rope scaling as the
``rope_freqs`` tensor llama.cpp's converter generates."""

from __future__ import annotations

import math

import numpy as np

from exporters.gguf.families.base import MT, GgufFamily, register_gguf_family
from gatenorm.architectures import gguf_tensor

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


@register_gguf_family("llama")
class LlamaGguf(GgufFamily):
    """Llama (and Mistral): deci runs every action; llama3 rope scaling as ``rope_freqs``."""

    rope_types = ("llama3",)

    def extra_tensors(self, config: dict, head_dim: int) -> dict[str, np.ndarray]:
        scaling = config.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type")) == "llama3":
            return {ROPE_FREQS: llama3_rope_factors(config, head_dim)}
        return {}
