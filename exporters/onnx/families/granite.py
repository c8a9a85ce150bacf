"""Granite: embedding and logit multipliers (the attention and residual ones live in the adapter)."""

from __future__ import annotations

from exporters.onnx.families.base import OnnxFamily, register_onnx_family


@register_onnx_family("granite")
class GraniteOnnx(OnnxFamily):
    """Granite: embeddings times ``embedding_multiplier``, logits divided by ``logits_scaling``."""

    def embedding_scale(self, config) -> float:
        return float(getattr(config, "embedding_multiplier", 1.0))

    def logits_divisor(self, config) -> float:
        return float(getattr(config, "logits_scaling", 1.0))
